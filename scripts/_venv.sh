# Sourced by scripts/*: create or reuse .venv in the checkout and install the project with EXTRAS.
# Re-installs only when pyproject.toml, setup.py, the C++ sources or the extras change.
# Debian packages the tests and the device runtime use (Mosquitto for the real-broker tests).
ensure_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "please install: ${missing[*]} (apt-get needs root)" >&2
        return 1
    fi
    echo "installing ${missing[*]} with apt-get (once)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    }
}

ensure_venv() {
    local extras="$1"
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local py="${PYTHON:-}"
    if [ -z "$py" ]; then
        for candidate in python3.11 python3; do
            if command -v "$candidate" >/dev/null 2>&1; then py="$candidate"; break; fi
        done
    fi
    if [ ! -x "$root/.venv/bin/python" ]; then
        echo "creating $root/.venv with $($py --version)" >&2
        "$py" -m venv "$root/.venv"
    fi
    # shellcheck disable=SC1091
    . "$root/.venv/bin/activate"
    python - <<'PY' || { echo "bouncer needs Python >= 3.11" >&2; return 1; }
import sys; sys.exit(sys.version_info < (3, 11))
PY
    local stamp="$root/.venv/.bouncer-stamp-${extras//,/-}"
    local want
    # the C++ hot path is compiled at install time: its sources are part of the stamp
    want="$(cat "$root/pyproject.toml" "$root/setup.py" "$root"/cpp_ext/*.cpp | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "installing bouncer[$extras] into .venv (once)" >&2
        python -m pip install -q --upgrade pip >&2
        # torch==2.14.1 and torchvision==0.29.1 are pinned in the [build] and [detector-train] extras: the pair
        # that imports together (PyPI's torchvision fails beside a CPU-only torch build)
        # BOUNCER_REQUIRE_HOTPATH: fail here, loudly, if the C++ extension does not compile
        BOUNCER_REQUIRE_HOTPATH=1 python -m pip install -q -e "$root[$extras]" >&2
        case ",$extras," in
            *,dev,* | *,detector-train,*)
                # ultralytics (AGPL-3.0, trains the example detector) without its opencv-python requirement,
                # which would overwrite opencv-python-headless's cv2 with a build that needs a display's libraries;
                # its other requirements are in the [detector-train] extra
                python -m pip install -q --no-deps "ultralytics==$(sed -n 's/^# ultralytics==\(.*\)$/\1/p' "$root/pyproject.toml")" >&2
                ;;
        esac
        echo "$want" > "$stamp"
    fi
}
