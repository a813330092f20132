"""Router initialisation from domain data: each expert's row is the normalised mean router input
over a sample of that expert's own domain.

The router input of layer i is the hidden state after attention and the pre-MLP norm, i.e.
exactly what the router sees (an attention router's, with attention experts: the layer's input
after the input norm). It is computed through the merged model's earlier layers (with
their routers already set), one layer at a time with megatron-core's own TransformerLayer, so the
merge still holds one layer at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from megatron_btx.checkpoint.mapping import ROUTER
from megatron_btx.errors import BTXError
from megatron_btx.merge.attention import ATTENTION_ROUTER
from megatron_btx.models.llama import LlamaArgs, MoEVariant, build_for_checkpoint


def load_tokens(
    spec: str, tokenizer_path: Path | None, n_tokens: int, seq_len: int
) -> torch.Tensor:
    """[num_seqs, seq_len] token ids from an indexed dataset prefix, a text / jsonl file, or a
    blend of prefixes ``PREFIX@WEIGHT,PREFIX@WEIGHT,...`` (the seed's row in a BTX run)."""
    if _is_blend(spec):
        return blend_tokens(spec, tokenizer_path, n_tokens, seq_len)
    if Path(spec + ".idx").is_file() and Path(spec + ".bin").is_file():
        ids = _dataset_tokens(spec, n_tokens, seq_len)
    elif Path(spec).is_file():
        ids = _text_tokens(Path(spec), tokenizer_path, n_tokens)
    else:
        raise BTXError(
            f"--centroid-data {spec}: neither an indexed dataset prefix ({spec}.bin/.idx) nor a "
            f"text/jsonl file"
        )
    if len(ids) < seq_len:
        raise BTXError(f"--centroid-data {spec}: only {len(ids)} tokens; need at least {seq_len}")
    n_seqs = min(len(ids), n_tokens) // seq_len
    return torch.tensor(ids[: n_seqs * seq_len], dtype=torch.long).reshape(n_seqs, seq_len)


def _is_blend(spec: str) -> bool:
    """A blend spec, not a path: it has a comma or a weight and names no existing file."""
    if Path(spec).is_file() or Path(spec + ".idx").is_file():
        return False
    return "," in spec or "@" in spec


def blend_tokens(spec: str, tokenizer_path, n_tokens: int, seq_len: int) -> torch.Tensor:
    """Each part's share of `n_tokens`, by its weight (parts too small for one sequence get
    none), stacked: a sample of the blend."""
    parts = []
    for item in spec.split(","):
        source, _, weight = item.partition("@")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = float("nan")
        if not source or not value >= 0 or value == float("inf"):
            raise BTXError(f"--centroid-data {spec}: {item!r} is not PREFIX or PREFIX@WEIGHT")
        parts.append((source, value))
    total = sum(w for _, w in parts)
    if total <= 0:
        raise BTXError(f"--centroid-data {spec}: the weights sum to 0")
    samples = []
    for source, weight in parts:
        share = int(round(n_tokens * weight / total / seq_len)) * seq_len
        if share >= seq_len:
            samples.append(load_tokens(source, tokenizer_path, share, seq_len))
    if not samples:
        raise BTXError(f"--centroid-data {spec}: no part gets a sequence of {seq_len} tokens")
    return torch.cat(samples)


def _dataset_tokens(prefix: str, n_tokens: int, seq_len: int) -> list[int]:
    """Documents spread evenly over the dataset until `n_tokens` are gathered."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    n_docs = len(dataset)
    if n_docs == 0:
        raise BTXError(f"{prefix}: the indexed dataset has no documents")
    stride = max(1, n_docs // max(1, n_tokens // max(1, seq_len)))
    ids: list[int] = []
    for start in (0, 1):  # a second, offset pass when the first did not gather enough
        doc = start
        while len(ids) < n_tokens and doc < n_docs:
            ids.extend(int(x) for x in dataset[doc])
            doc += stride
    return ids


def _text_tokens(path: Path, tokenizer_path: Path | None, n_tokens: int) -> list[int]:
    if tokenizer_path is None:
        raise BTXError(
            f"{path}: a text file needs a tokenizer (tokenizer.model or tokenizer.json) in the "
            f"sources or --tokenizer"
        )
    from megatron_btx.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    content = path.read_text(encoding="utf-8", errors="replace")
    texts = [content]
    if path.suffix == ".jsonl":
        texts = []
        for line in content.splitlines():
            with contextlib.suppress(Exception):
                texts.append(json.loads(line)["text"])
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
        if len(ids) >= n_tokens:
            break
    return ids


class CentroidRouter:
    """Sets each MoE layer's router rows from the domain samples' hidden states, layer by layer
    (the :class:`~megatron_btx.merge.router_inits.LayerRouters` of the centroid init)."""

    @classmethod
    def for_job(cls, job) -> CentroidRouter:
        """For one merge: each routed source's domain sample, tokenized and checked."""
        return cls(job.dense, job.out_args, job.plan, job_tokens(job), job.variant)

    def __init__(
        self,
        dense_args: LlamaArgs,
        out_args: LlamaArgs,
        plan: Any,  # the merge's MergePlan
        tokens: dict[int, torch.Tensor],
        variant: MoEVariant,
    ):
        self.dense_args = dense_args
        self.out_args = out_args
        self.plan = plan
        self.tokens = tokens  # per source index: [n, S]
        #: one MoE layer's variant (a shared expert; the layer pattern does not apply)
        self.layer_variant = dataclasses.replace(
            variant, layer_freq=None, dense_ffn_hidden_size=None
        )
        #: one dense layer's (its attention experts, if any)
        self.dense_variant = MoEVariant(
            attention_experts=variant.attention_experts,
            attention_shared_kv=variant.attention_shared_kv,
        )
        self.hidden: dict[int, torch.Tensor] = {}

    def embed(self, embedding: torch.Tensor) -> None:
        """Start every domain's hidden states [S, B, H] from the merged embedding."""
        table = embedding.to(torch.float32)
        for source, ids in self.tokens.items():
            self.hidden[source] = table[ids].transpose(0, 1).contiguous()

    def _layer_model(self, moe: bool, merged: dict[str, torch.Tensor]):
        """A one-layer model holding the merged layer (a zero router for now)."""
        args = dataclasses.replace(self.out_args if moe else self.dense_args, num_hidden_layers=1)
        variant = self.layer_variant if moe else self.dense_variant
        model = build_for_checkpoint(
            args, torch.float32, variant, pre_process=False, post_process=False
        )
        model.eval()
        state = model.state_dict()
        prefix = "decoder.layers.0."
        for key in list(state):
            short = key[len(prefix) :]
            if key.endswith("_extra_state"):
                continue
            if short == ROUTER or (short == ATTENTION_ROUTER and short not in merged):
                # set once their rows are known (an MoE's own rows under --into come first)
                state[key] = torch.zeros_like(state[key])
            elif short in merged:
                state[key] = merged[short].to(torch.float32)
            else:
                raise KeyError(f"the merged layer has no {short}")
        model.load_state_dict(state, strict=False)
        return model

    def _forward(self, model, hidden: torch.Tensor) -> torch.Tensor:
        layer = model.decoder.layers[0]
        out = layer(
            hidden_states=hidden,
            attention_mask=None,
            rotary_pos_emb=model.rotary_pos_emb(hidden.shape[0]),
        )
        return (out[0] if isinstance(out, tuple) else out).detach()

    @torch.no_grad()
    def layer(self, layer, merged, shape=None) -> torch.Tensor | None:
        """Set layer `layer`'s router (MoE layers; returned) and advance every domain's hidden
        states through the merged layer (whose router rows in `merged`, when given, come before
        the new ones: experts added to a trained MoE)."""
        moe = self.plan.is_moe_layer(layer)
        model = self._layer_model(moe, merged)
        router = None
        if moe:
            router = self._router_rows(model)
            kept = merged.get(ROUTER)  # rows that stay first (an MoE's own, under --into)
            rows = router if kept is None else torch.cat([kept.to(torch.float32), router])
            model.decoder.layers[0].mlp.router.weight.copy_(rows)
        for source, hidden in self.hidden.items():
            self.hidden[source] = self._forward(model, hidden)
        return router

    def attention(self, layer, merged, shape) -> torch.Tensor:
        """The attention router's rows (LayerRouters' hook): :meth:`attention_rows`."""
        return self.attention_rows(layer, merged)

    @torch.no_grad()
    def attention_rows(self, layer: int, merged: dict[str, torch.Tensor]) -> torch.Tensor:
        """Layer `layer`'s attention router (BAM, merge.attention): row e is the normalised
        mean input of the attention over attention expert e's source's domain sample. Call
        before :meth:`run_layer`, which then routes with it."""
        model = self._layer_model(self.plan.is_moe_layer(layer), merged)
        router = model.decoder.layers[0].self_attention.router
        return self._router_rows(model, router, self.plan.attention_sources)

    def _router_rows(self, model, router=None, sources=None) -> torch.Tensor:
        """Rows of `router` (default: the MoE layer's) for `sources` (default: the routed
        experts'), from the mean input it sees on each source's domain sample."""
        captured: dict[str, torch.Tensor] = {}
        router = model.decoder.layers[0].mlp.router if router is None else router
        sources = self.plan.routed_expert_sources() if sources is None else sources
        hook = router.register_forward_pre_hook(
            lambda module, inputs: captured.__setitem__("x", inputs[0].detach().clone())
        )
        means = {}
        try:
            for source, hidden in self.hidden.items():
                self._forward(model, hidden)
                means[source] = captured["x"].reshape(-1, hidden.shape[-1]).float().mean(0)
        finally:
            hook.remove()
        rows = [means[s] / means[s].norm().clamp_min(1e-12) for s in sources]
        return torch.stack(rows)


def job_tokens(job) -> dict[int, torch.Tensor]:
    """Each routed source's domain sample [n, S] for a merge's centroid routers."""
    settings, sources = job.settings, job.sources
    # the routed experts' domains, and every attention expert's
    needed = sorted(set(job.plan.routed_expert_sources()) | set(job.plan.attention_sources))
    data = settings.centroid_data
    if not data or len(data) != len(sources):
        raise BTXError(
            f"{settings.name('router_init')} centroid needs {settings.name('centroid_data')} "
            f"with one entry per source ({len(sources)}: the experts in order, then the seed), "
            f"each an indexed-dataset prefix, a text/jsonl file or a blend PREFIX@W,PREFIX@W"
        )
    # a SentencePiece .model or an HF tokenizer folder; default: the sources' tokenizer
    tokenizer_path = Path(settings.tokenizer) if settings.tokenizer else None
    if tokenizer_path is None and job.tokenizer is not None:
        tokenizer_path = job.tokenizer.folder
    tokens = {}
    for source in needed:
        ids = load_tokens(
            data[source], tokenizer_path, settings.centroid_tokens, settings.centroid_seq_len
        )
        if int(ids.max()) >= job.dense.vocab_size:
            raise BTXError(
                f"{settings.name('centroid_data')} {data[source]}: token id {int(ids.max())} >= "
                f"vocab_size {job.dense.vocab_size}; data tokenized with another tokenizer?"
            )
        tokens[source] = ids
    return tokens
