# Source from the repo root on the GPU machine: installs what travels in .whl/ (FlashInfer and its
# tvm-ffi as wheels; TileLang + z3 as one xz archive of an installed site folder, since their
# wheels exceed what one call may carry) into /tmp/site and sets PYTHONPATH, CUDA_HOME.
if [ -f .whl/tl_site.tar.xz ] && [ ! -d /tmp/site/tilelang ]; then
  mkdir -p /tmp && tar -xJf .whl/tl_site.tar.xz -C /tmp
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export FLASHINFER_CUDA_ARCH_LIST=9.0a
CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")") && export CUDA_HOME
