# megatron_btx on NVIDIA's PyTorch image, which brings CUDA, NCCL, Transformer Engine and apex:
# the fast path (TE layer specs, fused kernels, bf16) is chosen automatically on GPUs.
#   docker build -t megatron-btx:0.1.0 .
#   srun --container-image=megatron-btx:0.1.0 btx train CONFIG      (pyxis/enroot)
#   btx launch CONFIG --executor slurm --container-image IMAGE ...   (the whole BTX plan, from the
#   login node: jobs run `python -m megatron_btx ...` inside the image; examples/paper_7b)
FROM nvcr.io/nvidia/pytorch:25.10-py3

ARG BTX_VERSION=0.1.0
LABEL org.opencontainers.image.title="megatron-btx" \
      org.opencontainers.image.version="${BTX_VERSION}" \
      org.opencontainers.image.description="Branch-Train-MiX on megatron-core"

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/megatron_btx
COPY setup.py README.md ./
COPY docker/requirements.txt ./docker/requirements.txt
COPY megatron_btx ./megatron_btx
COPY tools ./tools
COPY examples ./examples

# The image's own torch, Transformer Engine and apex are kept: megatron-core and our package
# are installed on top without replacing them.
RUN pip install --no-cache-dir --requirement docker/requirements.txt \
    && pip install --no-cache-dir --no-deps . \
    && python -c "import megatron_btx as m; assert m.__version__ == '${BTX_VERSION}', m.__version__"

WORKDIR /workspace
ENTRYPOINT ["btx"]
CMD ["--help"]
