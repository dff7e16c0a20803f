# syntax=docker/dockerfile:1
# vLLM with LLMDConnector: the official vLLM image plus the vllm-llmd package, nothing compiled
# (the copy kernels are compiled at run time by NVRTC, from sources shipped in the wheel).
#
#   docker build -f deploy/docker/vllm.Dockerfile -t vllm-llmd:0.1.0 .
#   # or from PyPI instead of this checkout:
#   docker build -f deploy/docker/vllm.Dockerfile --build-arg VLLM_LLMD_SPEC=vllm-llmd==0.1.0 .
#
# vllm-llmd supports vLLM 0.32 and 0.33 (README "Use it with your vLLM").
ARG VLLM_TAG=v0.32.0
FROM vllm/vllm-openai:${VLLM_TAG}
# What pip installs: this checkout (default) or a PyPI requirement such as vllm-llmd==0.1.0.
ARG VLLM_LLMD_SPEC=/opt/vllm-llmd
COPY pyproject.toml setup.cfg README.md /opt/vllm-llmd/
COPY vllm_llmd /opt/vllm-llmd/vllm_llmd
COPY kernels /opt/vllm-llmd/kernels
# --no-deps: everything vllm-llmd needs (pyzmq, msgspec, numpy, ...) already ships with vLLM,
# and resolving would risk replacing the image's torch or vLLM.
# The build fails on a vLLM release vllm-llmd does not support, or if vLLM would not find the
# connector's plugin entry point.
RUN python3 -m pip install --no-cache-dir --no-deps "${VLLM_LLMD_SPEC}" \
    && rm -rf /opt/vllm-llmd \
    && python3 -c "from vllm_llmd.compat import check_vllm_version; check_vllm_version(); from importlib.metadata import entry_points; assert 'llmd_connector' in entry_points(group='vllm.general_plugins').names"
# The base image's entrypoint is kept: `vllm serve`. The connector is found through the
# vllm.general_plugins entry point: --kv-transfer-config '{"kv_connector":"LLMDConnector",...}'.
