#!/usr/bin/env bash
# Creates the environment if missing, then runs the whole chain on CIFAR-10 (train -> sweep -> prune ->
# fine-tune -> quantize -> export + validation -> host benchmark -> report). Extra arguments go to the chain,
# e.g. `bash scripts/run.sh --init ../shared/models/cifar10_mobilenetv2_w1.0.pt --qat`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m bench chain "$@"
