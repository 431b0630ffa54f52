# Shared by scripts/run, scripts/test and scripts/bench: find Python >= 3.12 and keep a venv
# per Python version under .venv/ with the project installed (editable; dev extras for the
# tests and benches, none for running).
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Print "VERSION PATH" for a working interpreter >= 3.12, or nothing.
_probe() {
  "$@" -c 'import sys; assert sys.version_info >= (3, 12); print("%d.%d" % sys.version_info[:2], sys.executable)' 2>/dev/null || true
}

# Every usable interpreter, one line each ("3.12 /path/python"), one per minor version.
find_pythons() {
  local seen="" line ver
  {
    for c in python3.13 python3.12 python3.14 python3; do
      if command -v "$c" >/dev/null 2>&1; then _probe "$c"; fi
    done
    if command -v pyenv >/dev/null 2>&1; then
      for p in "$(pyenv root)"/versions/3.1[2-9]*/bin/python; do
        [ -x "$p" ] && _probe "$p"
      done
    fi
    if command -v uv >/dev/null 2>&1; then
      local p; p="$(uv python find '>=3.12' 2>/dev/null || true)"
      if [ -n "$p" ]; then _probe "$p"; fi
    fi
  } | while read -r ver line; do
    case " $seen " in *" $ver "*) continue ;; esac
    seen="$seen $ver"
    echo "$ver $line"
  done | sort -V
}

no_python() {
  cat >&2 <<'MSG'
No Python >= 3.12 found (mitmproxy 12 needs it; mitmproxy 11 pins a vulnerable h11).
Install one, for example:
  pyenv install 3.12      # or
  uv python install 3.12  # or your system's python3.12 package
then run this command again.
MSG
  exit 1
}

# ensure_venv PYTHON [KIND] [PIN] [NAME] -> prints the venv's python; installs or updates the
# project when needed.
#   KIND  dev (default): the project with its dev extras (tests, benches);
#         run: only what running needs (a dev venv serves as well). pip shows its progress.
#   PIN   a pip requirement installed with the project, e.g. mitmproxy==12.2.3
#   NAME  the venv's folder under .venv/ (default py3.12; give one with a PIN, e.g.
#         py3.12-mitmproxy-lowest, so the pinned venv is not the one ./scripts/run uses)
ensure_venv() {
  local py="$1" kind="${2:-dev}" pin="${3:-}" name="${4:-}" ver venv stamp want have spec quiet=()
  case "$kind" in
    dev) spec="$ROOT[dev]" quiet=(-q) ;;
    run) spec="$ROOT" ;;
    *) echo "ensure_venv: KIND must be dev or run, not $kind" >&2; exit 2 ;;
  esac
  ver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  venv="$ROOT/.venv/${name:-py$ver}"
  stamp="$venv/.installed"
  want="$(sha256sum <"$ROOT/pyproject.toml" | cut -d' ' -f1) $pin"
  have="$(cat "$stamp" 2>/dev/null || true)"
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv" >&2
    "$py" -m venv "$venv" >&2 || exit 1
  fi
  # The stamp is "HASH PIN KIND"; a dev install serves a run as well.
  if [ "$have" != "$want $kind" ] && { [ "$kind" = dev ] || [ "$have" != "$want dev" ]; }; then
    echo "installing the project ($kind${pin:+, $pin}) into $venv (Python $ver) ..." >&2
    "$venv/bin/python" -m pip install "${quiet[@]}" --disable-pip-version-check -e "$spec" ${pin:+"$pin"} >&2 || exit 1
    echo "$want $kind" >"$stamp"
  fi
  echo "$venv/bin/python"
}

# The mitmproxy versions the suite runs against: "lowest" is pyproject's lower bound pinned
# (mitmproxy==12.2.3 for mitmproxy>=12.2.3,<13); "highest" is what pip resolves unpinned.
mitmproxy_lowest() {
  sed -n 's/^ *"mitmproxy>=\([0-9][0-9.]*\)[,"].*/\1/p' "$ROOT/pyproject.toml" | head -n 1 |
    awk -F. '{ printf "mitmproxy==%d.%d.%d\n", $1, ($2 == "" ? 0 : $2), ($3 == "" ? 0 : $3) }'
}

# The mitmproxy version a venv's python has, e.g. 12.2.3.
mitmproxy_version() {
  "$1" -c 'from mitmproxy.version import VERSION; print(VERSION)' 2>/dev/null || echo "?"
}

# ensure_tools BINARY:PACKAGE ...: install the Debian packages of missing server binaries with
# apt-get (root only); otherwise say what is missing and which tests will skip.
ensure_tools() {
  local missing=() spec
  for spec in "$@"; do
    command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing ${missing[*]} with apt-get ..." >&2
    local out; out="$(mktemp)"
    if ! (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq "${missing[@]}") >"$out" 2>&1 </dev/null; then
      tail -n 5 "$out" >&2
      echo "note: apt-get could not install ${missing[*]}; the tests that need them will skip" >&2
    fi
    rm -f "$out"
  else
    echo "note: ${missing[*]} not installed (needs root: sudo apt-get install ${missing[*]}); the tests that need them will skip" >&2
  fi
}
