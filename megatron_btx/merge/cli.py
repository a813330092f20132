"""`btx merge` (also tools/convert_dense_to_moe.py): the Branch-Train-MiX merge from the command
line. Parses the flags into one :class:`MergeSettings` and runs :func:`merge`."""

from __future__ import annotations

import argparse
import logging

from megatron_btx.errors import run_command
from megatron_btx.merge.run import merge
from megatron_btx.merge.settings import ATTENTION, MergeSettings


def _expert_map(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated source indices") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="btx merge",
        description="Branch-Train-MiX merge: N dense Llama checkpoints (HF safetensors or megatron "
        "torch_dist at any TP/PP) -> one megatron-core MoE torch_dist checkpoint. Expert i is "
        "source i's FFN, unchanged; every other tensor is the fp32 average of the sources; each "
        "layer gets a new router. Streams layer by layer: memory is bounded by one layer.",
    )
    _sources_and_layout(p)
    _router(p)
    _variants(p)
    _outputs(p)
    return p


def _sources_and_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--experts",
        nargs="+",
        required=True,
        metavar="DIR",
        help="dense expert checkpoints (HF folder, megatron checkpoint, or a run / "
        "checkpoints folder with a `latest` file); expert i = i-th source",
    )
    p.add_argument(
        "--seed",
        metavar="DIR",
        help="the seed model, kept as the last expert "
        "(the paper's generalist); or the shared expert with --seed-as-shared-expert",
    )
    p.add_argument("--save", required=True, metavar="DIR", help="output folder (atomic)")
    p.add_argument(
        "--tp", type=int, default=1, help="target tensor-parallel size (checked, recorded)"
    )
    p.add_argument(
        "--ep", type=int, default=1, help="target expert-parallel size (checked, recorded)"
    )
    p.add_argument(
        "--pp", type=int, default=1, help="target pipeline-parallel size (checked, recorded)"
    )
    p.add_argument(
        "--etp", type=int, default=None, help="target expert-tensor-parallel size (default: --tp)"
    )


def _router(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router-init", choices=["random", "zero", "centroid"], default="random")
    p.add_argument("--router-std", type=float, default=0.02, help="std of the random router")
    p.add_argument("--router-seed", type=int, default=1234, help="RNG seed of the random router")
    p.add_argument(
        "--centroid-data",
        nargs="+",
        metavar="PREFIX_OR_TEXT",
        help="per source (experts in order, then the seed): an indexed-dataset prefix "
        "or a text/jsonl file of that expert's domain, for --router-init centroid",
    )
    p.add_argument(
        "--centroid-tokens",
        type=int,
        default=2048,
        help="tokens of each domain sample for centroids",
    )
    p.add_argument("--centroid-seq-len", type=int, default=256)
    p.add_argument(
        "--tokenizer",
        help="tokenizer for text centroid data: a SentencePiece .model or an HF tokenizer folder "
        "(default: the sources')",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="experts per token (default 2, times C with --split-chunks)",
    )


def _variants(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--expert-map",
        type=_expert_map,
        default=None,
        metavar="I,J,...",
        help="routed expert j takes the FFN of source I_j (sources: "
        "experts in order, then the seed); default: one expert per source",
    )
    p.add_argument(
        "--average-weights",
        nargs="+",
        type=float,
        default=None,
        metavar="W",
        help="per-source weights of the averaged tensors (default: uniform)",
    )
    p.add_argument(
        "--split-chunks",
        type=int,
        default=1,
        metavar="C",
        help="split each FFN into C experts along the hidden FFN dimension (N*C experts)",
    )
    p.add_argument(
        "--blend",
        action="store_true",
        help="expert c = chunk c of every source's FFN (C = --split-chunks, default N)",
    )
    p.add_argument(
        "--seed-as-shared-expert",
        action="store_true",
        help="the seed's FFN becomes a shared expert (always active) instead of a routed one",
    )
    p.add_argument(
        "--moe-layers",
        default=None,
        metavar="SPEC",
        help="which layers become MoE: all (default), 0,2,5, every:K, last:K; the "
        "others keep a dense FFN",
    )
    p.add_argument(
        "--dense-ffn",
        choices=["average", "seed"],
        default="average",
        help="the FFN of non-MoE layers",
    )
    p.add_argument(
        "--attention",
        choices=list(ATTENTION),
        default="average",
        help="the attention: average (BTX), experts (BAM: every source's attention kept as an "
        "attention expert, mixed per token by a soft router in every layer) or "
        "experts_shared_kv (BAM with the key/value projections averaged and shared)",
    )


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="output dtype (default: the sources')",
    )
    p.add_argument("--export-hf", metavar="DIR", help="also write an HF Mixtral checkpoint")
    p.add_argument("--hf-shard-gb", type=float, default=1.0, help="HF export shard size")
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-read the output and check it against the sources before committing",
    )
    p.add_argument(
        "--no-verify-hashes",
        dest="verify_hashes",
        action="store_false",
        help="do not check megatron sources' files against their manifests' sha256",
    )
    p.add_argument(
        "--no-hash-output",
        dest="hash_output",
        action="store_false",
        help="do not record the output files' sha256 in its manifest (saves ~1 s of CPU per "
        "2 GB written; `btx verify` then has nothing to check)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(_merge, ns)


def _merge(ns: argparse.Namespace) -> int:
    written = merge(MergeSettings.from_args(ns))
    record = written["merge"]
    print(
        f"wrote {ns.save}: {record['num_experts']} experts (top-{record['top_k']}), "
        f"router {record['router_init']}" + (", verified" if ns.verify else "")
    )
    return 0
