#!/bin/sh
# `docker run IMAGE train ...` runs `resist-det train ...`; any other command (python, torchrun,
# deepspeed, sh) runs as given.
case "$1" in
    train|eval|export|plan|data|plot|bench|demo|cluster|--help|--version) exec resist-det "$@" ;;
    *) exec "$@" ;;
esac
