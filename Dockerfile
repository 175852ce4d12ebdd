# brain-ldm-nodes as a container: the BIDS App brain-ldm-bids is the entry point.
#
#   docker build -t brain-ldm-nodes .                                  # software only
#   docker build -t brain-ldm-nodes:model --build-arg MODEL=<hub-repo> \
#       --build-arg MODEL_REVISION=<commit> .                          # + the model, baked in
#   docker run --rm -v /data/ds:/data:ro -v /data/out:/out brain-ldm-nodes:model \
#       /data /out participant --participant-label 01
#
# Without a baked-in model, mount a bundle folder (from brain-ldm-convert) or a Hugging Face
# cache filled by brain-ldm-fetch, and pass --model:
#   docker run --rm -v /models:/models:ro ... brain-ldm-nodes /data /out participant \
#       --model /models/brain_ldm.1
# Apptainer/Singularity: see hpc/brain-ldm-nodes.def (or `apptainer build x.sif docker-daemon://...`).
FROM python:3.11-slim

ARG MODEL=""
ARG MODEL_REVISION=""

# The model cache lives in the image; run time is offline (compute nodes have no internet).
ENV HF_HOME=/opt/huggingface \
    BRAIN_LDM_COMPILATION_CACHE=/tmp/brain-ldm-jax-cache \
    BRAIN_LDM_CONTAINER_TYPE=docker \
    JAX_PLATFORMS=cpu \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml setup.cfg setup.py README.md /src/
COPY brain_ldm_nodes /src/brain_ldm_nodes
# g++ only to compile the oneDNN convolution extension (one file); libgomp1 stays (oneDNN's OpenMP).
RUN apt-get update && apt-get install -y --no-install-recommends g++ libgomp1 \
    && pip install /src && rm -rf /src \
    && apt-get purge -y g++ && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*

# Optional: download the model bundle and its base into the image's Hugging Face cache.
RUN if [ -n "$MODEL" ]; then \
        brain-ldm-fetch "$MODEL" ${MODEL_REVISION:+--revision "$MODEL_REVISION"}; \
    fi
ENV HF_HUB_OFFLINE=1 \
    BRAIN_LDM_MODEL=${MODEL} \
    BRAIN_LDM_MODEL_REVISION=${MODEL_REVISION}

# Run as an unprivileged user by default; outputs belong to whoever `docker run -u` names.
RUN useradd --create-home --uid 1000 brainldm && chmod -R a+rX /opt/huggingface 2>/dev/null || true
USER 1000
WORKDIR /home/brainldm

ENTRYPOINT ["brain-ldm-bids"]
CMD ["--help"]
