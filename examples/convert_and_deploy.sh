#!/usr/bin/env bash
# Convert on a workstation, copy the bundle to a board, generate there.
#
#   CHECKPOINT=path/to/stable-diffusion-v1-5 BOARD=pi@raspberrypi.local bash examples/convert_and_deploy.sh
#
# Without CHECKPOINT it builds a tiny random-weight SD checkpoint (offline) so the script
# runs anywhere; without BOARD it "deploys" to a local folder and runs there, which is what
# the board would do. The workstation needs `pip install torch==2.13.0 && pip install
# '.[convert]'`; the board needs only the runtime: `pip install edge_sdk_diffusion-*.whl` (a
# wheel built with `pip wheel --no-deps . -w dist`), no torch.
set -euo pipefail

WORK=${WORK:-$(mktemp -d)}
CHECKPOINT=${CHECKPOINT:-}
PRECISION=${PRECISION:-int8}          # int8: ~4x smaller UNet; see `edge-convert verify`
BOARD=${BOARD:-}                      # user@host, reached with ssh/scp
PROMPT=${PROMPT:-"a red circle on a blue background"}

# 1. workstation: the checkpoint (a real one, or a tiny one built offline)
if [[ -z "$CHECKPOINT" ]]; then
  CHECKPOINT="$WORK/checkpoint"
  edge-convert synth --arch tiny-sd1 -o "$CHECKPOINT"
fi

# 2. workstation: convert, then measure what the precision costs against the checkpoint
#    --vae-stages: the decoder also as stages, so a small board can decode in tiles (--memory low)
edge-convert "$CHECKPOINT" -o "$WORK/bundle" --precision "$PRECISION" --no-vae-encoder --vae-stages --overwrite
edge-convert verify "$WORK/bundle" --reference "$CHECKPOINT" --steps 8

# 3. copy to the board (the bundle is one self-describing folder; sha256s are checked on load)
if [[ -n "$BOARD" ]]; then
  scp -r "$WORK/bundle" "$BOARD:~/edge-bundle"
  ssh "$BOARD" "edge-sdk info ~/edge-bundle && edge-sdk generate '$PROMPT' --model ~/edge-bundle --memory low -o out.png"
else
  cp -r "$WORK/bundle" "$WORK/on-board"
  edge-sdk info "$WORK/on-board"
  edge-sdk generate "$PROMPT" --model "$WORK/on-board" --steps 8 --seed 1 --memory low -o "$WORK/out.png"
  echo "image: $WORK/out.png"
fi
