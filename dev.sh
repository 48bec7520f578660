#!/usr/bin/env bash
# The README's two commands; each sets up what it needs first (idempotent, safe to repeat).
#   ./dev.sh run  [alflow run options]   the main job on the bundled corpus: ingest, query,
#                                        pause for review in the Prefect UI, retrain
#   ./dev.sh test [pytest options]       the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV_DIR="${VENV_DIR:-.venv}"

die() { echo "dev.sh: $*" >&2; exit 1; }

setup() {  # $1: the pip extra to install besides the package ("" or "test")
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        || die "alflow needs Python 3.11 or newer (PYTHON=$PYTHON)"
    if [ ! -x "$VENV_DIR/bin/python" ]; then
        echo "dev.sh: creating $VENV_DIR" >&2
        "$PYTHON" -m venv "$VENV_DIR"
    fi
    local target="." stamp="$VENV_DIR/.alflow-installed"
    if [ -n "$1" ]; then target=".[$1]"; stamp="$stamp-$1"; fi
    # Reinstall only when the dependencies changed since the last successful install.
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "dev.sh: installing alflow ($target) into $VENV_DIR" >&2
        "$VENV_DIR/bin/python" -m pip install --quiet --disable-pip-version-check -e "$target"
        touch "$stamp"
    fi
}

ensure_chromium() {  # the browser test drives Debian's chromium (never a downloaded one)
    if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then return; fi
    if [ "${ALFLOW_SKIP_BROWSER_TESTS:-}" = 1 ]; then return; fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"; else
            echo "dev.sh: the browser test needs Debian's chromium: sudo apt-get install chromium" \
                 "(or set ALFLOW_SKIP_BROWSER_TESTS=1)" >&2
            return
        fi
    fi
    echo "dev.sh: installing chromium with apt-get" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
}

case "${1:-}" in
    run)
        shift
        setup ""
        exec "$VENV_DIR/bin/alflow" run "$@"
        ;;
    test)
        shift
        setup test
        ensure_chromium
        # Three workers (pytest-xdist) on 2 cores: a third of the suite's time is waiting
        # (Prefect servers starting, paused runs polling, a browser rendering, a cron
        # minute), which a third worker fills. A module runs on one worker (loadfile: its
        # module fixtures are built once), the longest first as tests/conftest.py orders
        # them (MODULE_SECONDS; --no-loadscope-reorder keeps that order). ALFLOW_TEST_WORKERS=0: one process.
        exec "$VENV_DIR/bin/python" -m pytest -n "${ALFLOW_TEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder "$@"
        ;;
    *)
        echo "usage: ./dev.sh run [alflow run options] | ./dev.sh test [pytest options]" >&2
        exit 2
        ;;
esac
