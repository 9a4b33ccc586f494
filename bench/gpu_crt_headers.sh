# Source after ../shared/gpu's .gpu/b/activate.sh on the GPU machine: MLX's NVRTC JIT needs crt/*.h beside
# nvidia/cu13/include, which that recipe's image lacks ("cannot open source file crt/mma.h" at head dim 64).
# Mirrors /tmp/site/nvidia with /usr/local/cuda/include/crt linked in, installs the checkout, sets PYTHONPATH.
if [ ! -e /tmp/site/nvidia/cu13/include/crt ] && [ -d /usr/local/cuda/include/crt ]; then
  nv=$(readlink -f /tmp/site/nvidia)
  rm -f /tmp/site/nvidia && mkdir -p /tmp/site/nvidia/cu13/include
  for e in "$nv"/*; do [ "$(basename "$e")" = cu13 ] || ln -sfn "$e" /tmp/site/nvidia/; done
  for e in "$nv"/cu13/*; do [ "$(basename "$e")" = include ] || ln -sfn "$e" /tmp/site/nvidia/cu13/; done
  for e in "$nv"/cu13/include/*; do ln -sfn "$e" /tmp/site/nvidia/cu13/include/; done
  ln -sfn /usr/local/cuda/include/crt /tmp/site/nvidia/cu13/include/crt
fi
ls -d /tmp/site/nvidia/cu13/include/crt >/dev/null && echo "crt headers: linked"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
