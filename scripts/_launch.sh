# Shared logic of the reproduction scripts (sourced, not run). A script sets MODEL, RUN (the log
# folder prefix), DEFAULT_PORT and SCRIPT_ARGS (the positional arguments it takes, optional ones in
# brackets, e.g. "DATA_PATH CKPT [MODEL]"), sources this file, calls `parse_args "$@"` and then `launch <main.py args>`
# with the paper's command line.
#
# Settings come from positional arguments first, then the environment:
#   DATA_PATH    ImageNet folder with train/ and val/ (required; scripts/prepare_imagenet.py makes it)
#   CKPT         checkpoint file (fine-tune and eval scripts); never downloaded, fetch it first
#   NPROC        processes (GPUs) on this machine, default 2 as in the paper
#   MASTER_PORT  rendezvous port, default DEFAULT_PORT (one per script, so runs can share a host)
#   OUTPUT_DIR   where main.py writes logs and checkpoints, default ./logs/<RUN>_<MODEL> in the repo
#   PYTHON       interpreter, default `python` (the active virtual environment's)
# Relative paths are taken from the directory the script is started in; the command runs from the
# repository root so that main.py resolves. `--dry-run` prints the command without running it.
# Arguments after `--` are appended to main.py's; for a repeated main.py flag the last one wins.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
NPROC="${NPROC:-2}"
MASTER_PORT="${MASTER_PORT:-$DEFAULT_PORT}"

usage_line() {
  echo "usage: $(basename "$0") [--dry-run] $SCRIPT_ARGS [-- MAIN_PY_ARGS...]" \
       "(or env ${SCRIPT_ARGS//[\[\]]/}; NPROC=$NPROC MASTER_PORT=$MASTER_PORT" \
       "OUTPUT_DIR=${OUTPUT_DIR:-./logs/${RUN}_$MODEL} PYTHON=$PYTHON)"
}

fail() {  # one line on stderr, exit status 2 (bad usage)
  echo "$(basename "$0"): error: $1; $(usage_line)" >&2
  exit 2
}

parse_args() {
  DRY_RUN=0
  EXTRA_ARGS=()
  local positional=() slots=(${SCRIPT_ARGS//[\[\]]/}) i
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) usage_line; exit 0 ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      -*) fail "unknown option $1" ;;
      *) positional+=("$1") ;;
    esac
    shift
  done
  ((${#positional[@]} <= ${#slots[@]})) || fail "too many arguments"
  for i in "${!positional[@]}"; do
    printf -v "${slots[i]}" '%s' "${positional[i]}"
  done
  [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || fail "NPROC must be a positive integer, got '$NPROC'"
  [[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || fail "MASTER_PORT must be a port number, got '$MASTER_PORT'"
  [[ -n "${DATA_PATH:-}" ]] || fail "no data path given"
  [[ -d "$DATA_PATH" ]] || fail "data path '$DATA_PATH' is not a directory"
  DATA_PATH="$(cd "$DATA_PATH" && pwd)"
  if [[ -z "${OUTPUT_DIR:-}" ]]; then
    OUTPUT_DIR="./logs/${RUN}_$MODEL"
  elif [[ "$OUTPUT_DIR" != /* ]]; then
    OUTPUT_DIR="$PWD/${OUTPUT_DIR#./}"
  fi
}

require_checkpoint() {  # CKPT must be an existing file (checkpoints are never downloaded at run time)
  [[ -n "${CKPT:-}" ]] || fail "no checkpoint given"
  [[ -f "$CKPT" ]] || fail "checkpoint '$CKPT' is not a file (download it first; see README)"
  CKPT="$(cd "$(dirname "$CKPT")" && pwd)/$(basename "$CKPT")"
}

launch() {  # print, then run (unless --dry-run), the distributed launch of `main.py "$@"`
  local cmd=("$PYTHON" -m torch.distributed.launch --nproc_per_node="$NPROC" --master_port "$MASTER_PORT"
             --use_env main.py "$@" "${EXTRA_ARGS[@]}")
  printf '+'
  printf ' %q' "${cmd[@]}"
  printf '\n'
  if ((DRY_RUN)); then
    exit 0
  fi
  cd "$REPO_ROOT"
  exec "${cmd[@]}"
}
