# One image for every disagg service: `docker run disagg:latest <subcommand> ...`.
#
#   docker build -t disagg:latest .                                   # CPU torch (default)
#   docker build -t disagg:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch
#
# The CUDA wheels bundle their CUDA libraries, so the slim base works; running on a GPU needs the
# NVIDIA container toolkit on the host (compose: `deploy.resources.reservations.devices`).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# /models exists and belongs to the service user so that a fresh named volume mounted there
# inherits that ownership and the `model` init service can write into it.
RUN useradd --create-home --uid 10001 --user-group disagg \
    && mkdir /models \
    && chown disagg:disagg /models

# torch first, from the chosen index; the constraint then keeps `pip install .` from swapping it
# for the (CUDA) build on PyPI. `==2.13.0` also matches local versions such as 2.13.0+cpu.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && echo "torch==${TORCH_VERSION}" > /etc/pip-constraints.txt

# Only what the wheel is built from (pyproject's package-dir folders); tests check this list.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services services
COPY shared shared
COPY kernels kernels
COPY cli cli
COPY benchmarks benchmarks
RUN pip install --constraint /etc/pip-constraints.txt . \
    && rm -rf /src

USER disagg
WORKDIR /home/disagg
ENTRYPOINT ["disagg"]
CMD ["--help"]
