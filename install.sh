#!/usr/bin/env bash
# install.sh: install moonflash from this checkout as the systemd service moonflash.service, next to Moonraker,
# or take it away again (--uninstall). ./install.sh --help says what it does and asks.
#
# Every step looks before it writes, so a second run changes nothing. The lines it adds to printer.cfg and
# moonraker.conf carry a "# moonflash: added by install.sh" comment, and --uninstall removes exactly those.
set -euo pipefail

REPO_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
SERVICE="moonflash"
SYSTEMD_DIR="${MOONFLASH_SYSTEMD_DIR:-/etc/systemd/system}"
UNIT_FILE="$SYSTEMD_DIR/$SERVICE.service"
MACROS_SRC="$REPO_DIR/moonraker/moonflash.cfg"
CONF_TEMPLATE="$REPO_DIR/moonraker/moonflash.conf"
INCLUDE_LINE="[include moonflash.cfg]"
INCLUDE_MARK="# moonflash: added by install.sh (install.sh --uninstall removes it and the next line)"
BLOCK_BEGIN="# >>> moonflash: added by install.sh (install.sh --uninstall removes this block)"
BLOCK_END="# <<< moonflash"
# What Moonraker writes to a missing moonraker.asvc (moonraker/assets/default_allowed_services): a file created
# here must keep them allowed, because Moonraker only fills in a file that does not exist.
MOONRAKER_DEFAULT_SERVICES=(klipper_mcu webcamd MoonCord KlipperScreen moonraker-telegram-bot moonraker-obico sonar
  crowsnest octoeverywhere ratos-configurator)

usage() {
  cat <<EOF
Usage: ./install.sh [--data DIR] [--user NAME] [--yes] [--no-npm]
       ./install.sh --uninstall [--data DIR] [--user NAME] [--yes]

Installs moonflash from $REPO_DIR as the systemd service $SERVICE.service:
  - checks Node.js >= 20.19 and npm, runs npm ci --omit=dev here
  - writes $UNIT_FILE and DIR/systemd/moonflash.env (MOONFLASH_ARGS), enables and (re)starts the service
  - adds moonflash to DIR/moonraker.asvc, so Moonraker may manage the service
  - links DIR/config/moonflash.cfg (the macros) to this checkout's moonraker/moonflash.cfg
  - writes a commented DIR/config/moonflash.conf when there is none (never overwrites it)
  - asks before adding $INCLUDE_LINE to printer.cfg and [update_manager moonflash] to moonraker.conf,
    and before restarting Moonraker; answered no, it prints what to add
A second run changes nothing that is already in place.

Options:
  --data DIR    the printer's data directory (default: ~NAME/printer_data)
  --user NAME   the user the service runs as, Moonraker's user (default: \$SUDO_USER under sudo, else you)
  --yes, -y     answer yes to every question
  --no-npm      skip npm ci --omit=dev (or set MOONFLASH_SKIP_NPM=1)
  --uninstall   stop, disable and remove the service and its env file, and remove what install.sh added (the
                moonraker.asvc line, the include line, the update_manager block, the macros link); keeps
                moonflash.conf and DIR/moonflash/ (history, firmware images, OTA backups)
  --help, -h    this text

Run it as the user Moonraker runs as (systemctl and the unit go through sudo), or with sudo.
MOONFLASH_SYSTEMD_DIR overrides where the unit goes (default /etc/systemd/system).
EOF
}

say() { printf '%s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'install.sh: %s\n(see ./install.sh --help)\n' "$*" >&2; exit 2; }

DATA_DIR=""
TARGET_USER=""
ASSUME_YES=0
UNINSTALL=0
RUN_NPM=1
if [[ "${MOONFLASH_SKIP_NPM:-0}" == "1" ]]; then RUN_NPM=0; fi

while (($# > 0)); do
  case "$1" in
    --data | --user)
      if (($# < 2)) || [[ -z "$2" ]]; then usage_error "$1 needs a value"; fi
      if [[ "$1" == "--data" ]]; then DATA_DIR="$2"; else TARGET_USER="$2"; fi
      shift 2
      ;;
    --data=*) DATA_DIR="${1#*=}"; shift ;;
    --user=*) TARGET_USER="${1#*=}"; shift ;;
    -y | --yes) ASSUME_YES=1; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --no-npm) RUN_NPM=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done

# Paths end up in a systemd unit, an env file and INI files: refuse what any of them would mangle.
safe_path() { [[ "$1" =~ ^/[A-Za-z0-9._/@+-]*$ ]]; }

CURRENT_USER="$(id -un)"
if [[ -z "$TARGET_USER" ]]; then
  if [[ "$EUID" -eq 0 && -n "${SUDO_USER:-}" ]]; then TARGET_USER="$SUDO_USER"; else TARGET_USER="$CURRENT_USER"; fi
fi
[[ "$TARGET_USER" =~ ^[A-Za-z_][A-Za-z0-9_.-]*$ ]] || die "not a user name: $TARGET_USER"
id -u -- "$TARGET_USER" >/dev/null 2>&1 || die "no such user: $TARGET_USER"
if [[ "$TARGET_USER" != "$CURRENT_USER" && "$EUID" -ne 0 ]]; then
  die "installing for $TARGET_USER needs root: run install.sh as $TARGET_USER, or with sudo"
fi
[[ "$TARGET_USER" != "root" ]] || warn "the service will run as root; Moonraker's user (e.g. pi) is the usual choice (--user)"

if [[ "$TARGET_USER" == "$CURRENT_USER" ]]; then
  TARGET_HOME="$HOME"
else
  TARGET_HOME="$(getent passwd -- "$TARGET_USER" | cut -d: -f6)"
fi
[[ -n "$DATA_DIR" ]] || DATA_DIR="$TARGET_HOME/printer_data"
[[ -d "$DATA_DIR" ]] || die "no printer data directory at $DATA_DIR: give Moonraker's data directory with --data"
DATA_DIR="$(cd -- "$DATA_DIR" && pwd)"
safe_path "$DATA_DIR" || die "the data directory's path has characters install.sh does not write into a unit: $DATA_DIR"
safe_path "$REPO_DIR" || die "this checkout's path has characters install.sh does not write into a unit: $REPO_DIR"
[[ -f "$REPO_DIR/dist/moonflash.mjs" && -f "$MACROS_SRC" && -f "$CONF_TEMPLATE" ]] ||
  die "$REPO_DIR is not a moonflash checkout (dist/moonflash.mjs, moonraker/moonflash.cfg or moonraker/moonflash.conf missing)"

CONFIG_DIR="$DATA_DIR/config"
ENV_FILE="$DATA_DIR/systemd/moonflash.env"
ASVC_FILE="$DATA_DIR/moonraker.asvc"
PRINTER_CFG="$CONFIG_DIR/printer.cfg"
MOONRAKER_CONF="$CONFIG_DIR/moonraker.conf"
MACROS_LINK="$CONFIG_DIR/moonflash.cfg"
MOONFLASH_CONF="$CONFIG_DIR/moonflash.conf"
MOONFLASH_ARGS="serve --data $DATA_DIR"

TMP_DIR="$(mktemp -d)"
trap 'rm -rf -- "$TMP_DIR"' EXIT

DONE=()   # what this run changed
NEXT=()   # what the user still has to do
RESTART_MOONRAKER=0

as_root() { if [[ "$EUID" -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
as_user() { if [[ "$TARGET_USER" == "$CURRENT_USER" ]]; then "$@"; else sudo -u "$TARGET_USER" -H "$@"; fi; }
# Files written into the data directory belong to the service's user, also when root runs install.sh.
own() { if [[ "$EUID" -eq 0 && "$TARGET_USER" != "$CURRENT_USER" ]]; then chown -h -- "$TARGET_USER:" "$@"; fi; }
# systemctl present and systemd running (sd_booted(3): /run/systemd/system exists); a container or a chroot may have
# the one without the other, and then every systemctl call fails. MOONFLASH_SYSTEMD_RUN: that directory (tests).
have_systemctl() { command -v systemctl >/dev/null 2>&1 && [[ -d "${MOONFLASH_SYSTEMD_RUN:-/run/systemd/system}" ]]; }

# ask QUESTION: 0 for yes. --yes answers yes; otherwise one line from stdin (end of input is no).
ask() {
  if ((ASSUME_YES)); then say "$1 yes (--yes)"; return 0; fi
  local answer=""
  printf '%s [y/N] ' "$1"
  IFS= read -r answer || answer=""
  [[ -t 0 ]] || printf '%s\n' "$answer"
  [[ "$answer" =~ ^[Yy]([Ee][Ss])?$ ]]
}

# replace FILE TEMP: write TEMP's bytes into FILE in place (owner, mode and a symlinked FILE stay as they were).
replace() { cat -- "$2" >"$1"; }

has_include() { [[ -f "$PRINTER_CFG" ]] && grep -Eq '^[[:space:]]*\[include[[:space:]]+moonflash\.cfg[[:space:]]*\]' "$PRINTER_CFG"; }
has_update_manager() { [[ -f "$MOONRAKER_CONF" ]] && grep -Eq '^[[:space:]]*\[update_manager[[:space:]]+moonflash[[:space:]]*\]' "$MOONRAKER_CONF"; }
has_asvc_line() { [[ -f "$ASVC_FILE" ]] && grep -Eq '^[[:space:]]*moonflash(\.service)?[[:space:]]*$' "$ASVC_FILE"; }
ends_without_newline() { [[ -s "$1" && -n "$(tail -c 1 -- "$1")" ]]; }

print_next_and_exit() {
  if ((${#NEXT[@]} > 0)); then
    say ""
    say "Next:"
    local item
    for item in "${NEXT[@]}"; do say "  - $item"; done
  fi
  exit 0
}

offer_moonraker_restart() {
  ((RESTART_MOONRAKER)) || return 0
  if ! have_systemctl; then
    NEXT+=("restart Moonraker, which reads moonraker.asvc and [update_manager] only when it starts")
  elif ask "Restart Moonraker now? It reads moonraker.asvc and [update_manager] only when it starts (a print goes on)."; then
    if as_root systemctl restart moonraker; then
      DONE+=("restarted Moonraker")
    else
      NEXT+=("Moonraker did not restart: sudo systemctl restart moonraker")
    fi
  else
    NEXT+=("restart Moonraker, which reads moonraker.asvc and [update_manager] only when it starts: sudo systemctl restart moonraker")
  fi
}

# ------------------------------------------------------------------------------------------------- console filters
# Mainsail and Fluidd show each moonflash console line twice (the message, and the RESPOND command Moonraker stored):
# `moonflash console-filters` adds a filter named "moonflash" to their settings in Moonraker's database. It needs
# Moonraker running; without its socket the summary says what to run later.
console_filters() { # add | remove
  local sock="$DATA_DIR/comms/moonraker.sock" node cli later out
  node="$(command -v node || true)"
  cli="$REPO_DIR/dist/moonflash.mjs"
  later="$node $cli console-filters --data $DATA_DIR"
  if [[ "$1" == remove ]]; then later+=" --remove"; fi
  if [[ -z "$node" || ! -S "$sock" ]]; then
    if [[ "$1" == add ]]; then NEXT+=("once Moonraker runs, so that moonflash's console lines show once in Mainsail/Fluidd: $later"); fi
    if [[ "$1" == remove ]] && ((${#DONE[@]} > 0)); then NEXT+=("Moonraker is not running: remove the console filter \"moonflash\" once it is: $later"); fi
    return 0
  fi
  if [[ "$1" == add ]]; then
    out="$(as_user "$node" "$cli" console-filters --check --data "$DATA_DIR" --json 2>/dev/null || true)"
    # A filter an older moonflash added (the user said yes then) is brought up to date without asking again.
    [[ "$out" == *'"absent"'* || "$out" == *'"outdated"'* ]] || return 0
    if [[ "$out" == *'"absent"'* ]] && ! ask "Add a console filter \"moonflash\" to Mainsail/Fluidd, so that each moonflash line shows once?"; then
      NEXT+=("to see moonflash's console lines once in Mainsail/Fluidd: $later")
      return 0
    fi
  fi
  if out="$(as_user "$node" "$cli" console-filters "${@:2}" --data "$DATA_DIR" --json 2>&1)"; then
    if [[ "$out" == *'"added"'* ]]; then DONE+=("added the console filter \"moonflash\" to Mainsail/Fluidd (reload the page)"); fi
    if [[ "$out" == *'"updated"'* ]]; then DONE+=("brought the console filter \"moonflash\" in Mainsail/Fluidd up to date (reload the page)"); fi
    if [[ "$out" == *'"removed"'* ]]; then DONE+=("removed the console filter \"moonflash\" from Mainsail/Fluidd"); fi
  else
    NEXT+=("the console filter could not be changed (${out##*$'\n'}): $later")
  fi
}

# ---------------------------------------------------------------------------------------------------------- uninstall
if ((UNINSTALL)); then
  if [[ -f "$UNIT_FILE" ]]; then
    if have_systemctl; then
      as_root systemctl stop "$SERVICE" || warn "systemctl stop $SERVICE failed"
      as_root systemctl disable "$SERVICE" || warn "systemctl disable $SERVICE failed"
    fi
    as_root rm -f -- "$UNIT_FILE"
    if have_systemctl; then
      as_root systemctl daemon-reload
      DONE+=("stopped and disabled $SERVICE, removed $UNIT_FILE")
    else
      DONE+=("removed $UNIT_FILE")
      NEXT+=("systemd is not running here: stop moonflash with the service manager that runs it")
    fi
  fi
  if [[ -f "$ENV_FILE" ]]; then
    rm -f -- "$ENV_FILE"
    DONE+=("removed $ENV_FILE")
  fi

  if has_asvc_line; then
    awk '$0 !~ /^[[:space:]]*moonflash(\.service)?[[:space:]]*$/' "$ASVC_FILE" >"$TMP_DIR/asvc"
    replace "$ASVC_FILE" "$TMP_DIR/asvc"
    DONE+=("removed moonflash from $ASVC_FILE")
    RESTART_MOONRAKER=1
  fi

  if [[ -f "$PRINTER_CFG" ]] && grep -Fxq -- "$INCLUDE_MARK" "$PRINTER_CFG"; then
    awk -v mark="$INCLUDE_MARK" -v line="$INCLUDE_LINE" '
      after_mark { after_mark = 0; if ($0 == line) next }
      $0 == mark { after_mark = 1; next }
      { print }' "$PRINTER_CFG" >"$TMP_DIR/printer.cfg"
    replace "$PRINTER_CFG" "$TMP_DIR/printer.cfg"
    DONE+=("removed $INCLUDE_LINE from $PRINTER_CFG")
    NEXT+=("restart Klipper (RESTART in the console) so that it drops the moonflash macros")
  fi
  if has_include; then
    warn "$PRINTER_CFG still has $INCLUDE_LINE, which install.sh did not add: remove it before Klipper restarts, moonflash.cfg is gone"
  fi

  if [[ -f "$MOONRAKER_CONF" ]] && grep -Fxq -- "$BLOCK_BEGIN" "$MOONRAKER_CONF"; then
    if awk -v begin="$BLOCK_BEGIN" -v end="$BLOCK_END" '$0 == begin { seen = 1 } seen && $0 == end { found = 1 }
        END { exit !found }' "$MOONRAKER_CONF"; then
      # The block and the one blank line install.sh put before it.
      awk -v begin="$BLOCK_BEGIN" -v end="$BLOCK_END" '
        inside { if ($0 == end) inside = 0; next }
        $0 == begin { inside = 1; blank = 0; next }
        blank { print ""; blank = 0 }
        $0 == "" { blank = 1; next }
        { print }
        END { if (blank) print "" }' "$MOONRAKER_CONF" >"$TMP_DIR/moonraker.conf"
      replace "$MOONRAKER_CONF" "$TMP_DIR/moonraker.conf"
      DONE+=("removed [update_manager moonflash] from $MOONRAKER_CONF")
      RESTART_MOONRAKER=1
    else
      warn "$MOONRAKER_CONF: the line '$BLOCK_END' that ends moonflash's block is gone; remove [update_manager moonflash] by hand"
    fi
  elif has_update_manager; then
    warn "$MOONRAKER_CONF has [update_manager moonflash], which install.sh did not add: remove it by hand"
  fi

  if [[ -L "$MACROS_LINK" && "$(readlink -- "$MACROS_LINK")" == "$MACROS_SRC" ]]; then
    rm -f -- "$MACROS_LINK"
    DONE+=("removed the macros link $MACROS_LINK")
  fi
  console_filters remove --remove
  if [[ -f "$CONFIG_DIR/.theme/navi.json" ]] && out="$(as_user "$(command -v node)" "$REPO_DIR/dist/moonflash.mjs" sidebar-link --remove --data "$DATA_DIR" --json 2>&1)" &&
    [[ "$out" == *'"removed"'* ]]; then
    DONE+=("removed \"moonflash\" from Mainsail's sidebar ($CONFIG_DIR/.theme/navi.json)")
  fi

  if ((${#DONE[@]} == 0)); then
    say "moonflash is not installed; nothing changed."
  else
    offer_moonraker_restart
    say "moonflash uninstalled (user $TARGET_USER, data $DATA_DIR):"
    for item in "${DONE[@]}"; do say "  - $item"; done
  fi
  [[ ! -e "$MOONFLASH_CONF" ]] || say "Left in place: $MOONFLASH_CONF (your configuration; delete it yourself if you want it gone)."
  [[ ! -d "$DATA_DIR/moonflash" ]] || say "Left in place: $DATA_DIR/moonflash/ (job history, firmware images, OTA backups)."
  print_next_and_exit
fi

# ------------------------------------------------------------------------------------------------ install: Node, npm
node_hint() {
  local system=""
  # shellcheck disable=SC1091 # the system's own file
  if [[ -r /etc/os-release ]]; then system="$(. /etc/os-release && printf '%s' "${PRETTY_NAME:-}")"; fi
  cat >&2 <<EOF
moonflash needs Node.js >= 20.19 and npm ($1).
On Raspberry Pi OS${system:+ (this system: $system)}:
  Trixie (Debian 13): its Node.js is 20.19:
      sudo apt update && sudo apt install nodejs npm
  Bookworm (Debian 12): its Node.js is 18, too old; install Node.js 22 from NodeSource (its nodejs includes npm):
      curl -fsSL https://deb.nodesource.com/setup_22.x -o /tmp/nodesource_setup.sh
      sudo bash /tmp/nodesource_setup.sh && sudo apt install nodejs
Then run ./install.sh again.
EOF
}

NODE_BIN="$(command -v node || true)"
if [[ -z "$NODE_BIN" ]]; then node_hint "node was not found"; exit 1; fi
NODE_VERSION="$("$NODE_BIN" --version 2>/dev/null || true)"
if [[ ! "$NODE_VERSION" =~ ^v([0-9]+)\.([0-9]+)\. ]]; then
  node_hint "$NODE_BIN does not tell its version"
  exit 1
fi
if ((BASH_REMATCH[1] < 20 || (BASH_REMATCH[1] == 20 && BASH_REMATCH[2] < 19))); then
  node_hint "found $NODE_VERSION at $NODE_BIN"
  exit 1
fi
if ! command -v npm >/dev/null 2>&1; then node_hint "npm was not found"; exit 1; fi
safe_path "$NODE_BIN" || die "node's path has characters install.sh does not write into a unit: $NODE_BIN"

# The service's node options come from package.json's "start" script, the one place they are written down.
NODE_OPTIONS_LINE="$("$NODE_BIN" -e '
  const pkg = JSON.parse(require("node:fs").readFileSync(process.argv[1], "utf8"));
  const words = String((pkg.scripts && pkg.scripts.start) || "").trim().split(/\s+/);
  const at = words.indexOf("dist/moonflash.mjs");
  const options = words.slice(1, at);
  if (words[0] !== "node" || at < 1 || !options.every((o) => /^--[a-z0-9-]+(=[A-Za-z0-9._-]+)?$/.test(o))) process.exit(3);
  process.stdout.write(options.join(" "));
' "$REPO_DIR/package.json")" || die "package.json's start script is not \"node [--options] dist/moonflash.mjs serve\""

if ((RUN_NPM)); then
  say "npm ci --omit=dev in $REPO_DIR ..."
  (cd -- "$REPO_DIR" && as_user npm ci --omit=dev --no-audit --no-fund) || die "npm ci --omit=dev failed in $REPO_DIR"
fi

# --------------------------------------------------------------------------------------------- install: the service
UNIT_CHANGED=0
cat >"$TMP_DIR/unit" <<EOF
# moonflash.service, written by $REPO_DIR/install.sh: run it again to rewrite this file, with --uninstall to remove it.
# The arguments are in $ENV_FILE (MOONFLASH_ARGS), as Klipper's are in klipper.env.
[Unit]
Description=moonflash: firmware flashing and OTA for Klipper
After=network-online.target moonraker.service
Wants=udev.target

[Install]
WantedBy=multi-user.target

[Service]
Type=simple
User=$TARGET_USER
WorkingDirectory=$REPO_DIR
Environment="MOONFLASH_ARGS=$MOONFLASH_ARGS"
EnvironmentFile=-$ENV_FILE
ExecStart=$NODE_BIN $NODE_OPTIONS_LINE $REPO_DIR/dist/moonflash.mjs \$MOONFLASH_ARGS
Restart=always
RestartSec=10
# A stop lets a running flash attempt end (timeout: 300 s by default) and Klipper start again (service_timeout: 90 s).
TimeoutStopSec=400
EOF
if ! cmp -s -- "$TMP_DIR/unit" "$UNIT_FILE"; then
  as_root install -m 0644 -- "$TMP_DIR/unit" "$UNIT_FILE"
  DONE+=("wrote $UNIT_FILE")
  UNIT_CHANGED=1
fi

if [[ ! -d "$DATA_DIR/systemd" ]]; then
  mkdir -- "$DATA_DIR/systemd"
  own "$DATA_DIR/systemd"
fi
ENV_LINE="MOONFLASH_ARGS=\"$MOONFLASH_ARGS\""
if [[ ! -f "$ENV_FILE" ]]; then
  printf '%s\n' "$ENV_LINE" >"$ENV_FILE"
  own "$ENV_FILE"
  DONE+=("wrote $ENV_FILE")
  UNIT_CHANGED=1
elif ! grep -Fxq -- "$ENV_LINE" "$ENV_FILE"; then
  say "Kept $ENV_FILE as it is (it differs from: $ENV_LINE)."
fi

if ! have_systemctl; then
  NEXT+=("systemd is not running here (or systemctl was not found): start moonflash with your service manager: $NODE_BIN $NODE_OPTIONS_LINE $REPO_DIR/dist/moonflash.mjs $MOONFLASH_ARGS")
elif ((UNIT_CHANGED)); then
  as_root systemctl daemon-reload
  as_root systemctl enable "$SERVICE"
  DONE+=("enabled $SERVICE")
  if as_root systemctl restart "$SERVICE"; then
    DONE+=("(re)started $SERVICE")
  else
    NEXT+=("$SERVICE did not start: journalctl -u $SERVICE, and $DATA_DIR/logs/moonflash.log")
  fi
else
  if ! systemctl is-enabled --quiet "$SERVICE"; then
    as_root systemctl enable "$SERVICE"
    DONE+=("enabled $SERVICE")
  fi
  if ! systemctl is-active --quiet "$SERVICE"; then
    if as_root systemctl restart "$SERVICE"; then
      DONE+=("started $SERVICE")
    else
      NEXT+=("$SERVICE did not start: journalctl -u $SERVICE, and $DATA_DIR/logs/moonflash.log")
    fi
  fi
fi

# ---------------------------------------------------------------------------------------- install: moonraker.asvc
if [[ ! -e "$ASVC_FILE" ]]; then
  printf '%s\n' "${MOONRAKER_DEFAULT_SERVICES[@]}" moonflash >"$ASVC_FILE"
  own "$ASVC_FILE"
  DONE+=("wrote $ASVC_FILE (Moonraker's default services and moonflash)")
  RESTART_MOONRAKER=1
elif ! has_asvc_line; then
  if ends_without_newline "$ASVC_FILE"; then printf '\n' >>"$ASVC_FILE"; fi
  printf 'moonflash\n' >>"$ASVC_FILE"
  DONE+=("added moonflash to $ASVC_FILE")
  RESTART_MOONRAKER=1
fi

# ------------------------------------------------------------------------------------------------ install: macros
# A link, not a copy: Moonraker's update_manager then updates the macros with the agent (a macro and the remote
# method it calls never drift apart), as mainsail.cfg is linked from mainsail-config. Do not edit it in Mainsail's
# editor (that would edit this checkout and block updates): override a macro in printer.cfg instead.
if [[ -L "$MACROS_LINK" ]]; then
  if [[ "$(readlink -- "$MACROS_LINK")" != "$MACROS_SRC" ]]; then
    warn "$MACROS_LINK links to $(readlink -- "$MACROS_LINK"), not to $MACROS_SRC: left as it is"
  fi
elif [[ -e "$MACROS_LINK" ]]; then
  if cmp -s -- "$MACROS_LINK" "$MACROS_SRC"; then
    ln -sf -- "$MACROS_SRC" "$MACROS_LINK"
    own "$MACROS_LINK"
    DONE+=("replaced the unchanged copy $MACROS_LINK with a link to $MACROS_SRC")
  else
    warn "$MACROS_LINK is a file of its own (it differs from $MACROS_SRC): left as it is; it will not get updates"
  fi
else
  ln -s -- "$MACROS_SRC" "$MACROS_LINK"
  own "$MACROS_LINK"
  DONE+=("linked $MACROS_LINK to $MACROS_SRC")
fi

# ---------------------------------------------------------------------------------------------- install: printer.cfg
if [[ ! -f "$PRINTER_CFG" ]]; then
  NEXT+=("$PRINTER_CFG was not found: add $INCLUDE_LINE to your printer's config")
elif ! has_include; then
  if ask "Add $INCLUDE_LINE at the top of $PRINTER_CFG?"; then
    { printf '%s\n%s\n' "$INCLUDE_MARK" "$INCLUDE_LINE"; cat -- "$PRINTER_CFG"; } >"$TMP_DIR/printer.cfg"
    replace "$PRINTER_CFG" "$TMP_DIR/printer.cfg"
    DONE+=("added $INCLUDE_LINE to $PRINTER_CFG")
    NEXT+=("restart Klipper (RESTART in the console) to load the moonflash macros")
  else
    NEXT+=("add this line at the top of $PRINTER_CFG, then RESTART Klipper:
      $INCLUDE_LINE")
  fi
fi
if ! grep -Eqs '^[[:space:]]*\[respond\]' "$CONFIG_DIR"/*.cfg; then
  NEXT+=("moonflash's macros answer with RESPOND: add a [respond] section to printer.cfg (none was found in $CONFIG_DIR/*.cfg)")
fi

# ------------------------------------------------------------------------------------------ install: sidebar link
# Mainsail keeps custom sidebar entries (config/.theme/navi.json) while Klipper is stopped and its Console is gone:
# one opens moonflash's status page, which shows a flash live then. `moonflash sidebar-link` keeps the user's own.
sidebar_link() { # mode args...
  as_user "$(command -v node)" "$REPO_DIR/dist/moonflash.mjs" sidebar-link --data "$DATA_DIR" --json "$@" 2>&1
}
out="$(sidebar_link --check || true)"
if [[ "$out" == *'"absent"'* ]]; then
  if ask "Add a \"moonflash\" entry to Mainsail's sidebar that opens the status page (it shows a flash while Klipper is stopped)?"; then
    if out="$(sidebar_link)"; then
      own "$CONFIG_DIR/.theme" "$CONFIG_DIR/.theme/navi.json"
      DONE+=("added \"moonflash\" to Mainsail's sidebar ($CONFIG_DIR/.theme/navi.json)")
    else NEXT+=("the sidebar link could not be added: ${out##*$'\n'}"); fi
  fi
elif [[ "$out" == *'"outdated"'* ]]; then
  # The printer's address changed since: the entry the user accepted follows it.
  if out="$(sidebar_link)"; then DONE+=("Mainsail's sidebar entry \"moonflash\" now opens the status page's current address"); fi
elif [[ "$out" != *'"present"'* ]]; then
  NEXT+=("Mainsail's sidebar link was not checked: ${out##*$'\n'}")
fi

# ------------------------------------------------------------------------------------------- install: moonflash.conf
# With Moonraker running, the template gets a commented section for each [mcu] of Klipper's config.
if [[ ! -e "$MOONFLASH_CONF" ]]; then
  conf_body="$TMP_DIR/moonflash.conf.body"
  made_from="all defaults, commented"
  if [[ -S "$DATA_DIR/comms/moonraker.sock" ]] &&
    as_user "$(command -v node)" "$REPO_DIR/dist/moonflash.mjs" init-conf --data "$DATA_DIR" --template "$CONF_TEMPLATE" >"$conf_body" 2>/dev/null &&
    grep -q '^# Klipper.s config has these MCUs' "$conf_body"; then
    made_from="commented, with a section for each MCU of Klipper's config"
  else
    cat -- "$CONF_TEMPLATE" >"$conf_body"
  fi
  {
    printf '# moonflash.conf, written by %s/install.sh, which never overwrites it; --uninstall leaves it.\n' "$REPO_DIR"
    printf '# See which boards and Klipper [mcu] sections moonflash sees: node %s/dist/moonflash.mjs devices --data %s\n' "$REPO_DIR" "$DATA_DIR"
    sed '1{/^# moonflash configuration: copy to /d;}' -- "$conf_body"
  } >"$MOONFLASH_CONF"
  own "$MOONFLASH_CONF"
  DONE+=("wrote $MOONFLASH_CONF ($made_from)")
fi

# ------------------------------------------------------------------------------------------- install: update_manager
git_in_repo() { git -c safe.directory="$REPO_DIR" -C "$REPO_DIR" "$@" 2>/dev/null; }
ORIGIN="$(git_in_repo remote get-url origin || true)"
BRANCH="$(git_in_repo symbolic-ref --short -q HEAD || true)"
if [[ -z "$ORIGIN" ]]; then
  if ! has_update_manager; then
    NEXT+=("$REPO_DIR has no git remote 'origin', so no [update_manager moonflash] was offered: clone moonflash with git to get updates from Mainsail/Fluidd")
  fi
elif [[ ! "$ORIGIN" =~ ^[A-Za-z0-9._:/@+~-]+$ ]]; then
  warn "the origin URL has unexpected characters, [update_manager moonflash] not offered: $ORIGIN"
elif [[ ! -f "$MOONRAKER_CONF" ]]; then
  NEXT+=("$MOONRAKER_CONF was not found: add [update_manager moonflash] to Moonraker's config (./install.sh --help)")
elif ! has_update_manager; then
  if [[ -z "$BRANCH" ]]; then
    BRANCH="main"
    warn "$REPO_DIR is not on a branch: primary_branch: main"
  fi
  {
    printf '%s\n' "$BLOCK_BEGIN" \
      "[update_manager moonflash]" \
      "type: git_repo" \
      "path: $REPO_DIR" \
      "origin: $ORIGIN" \
      "primary_branch: $BRANCH" \
      "enable_node_updates: True" \
      "managed_services: moonflash" \
      "info_tags:" \
      "  desc=moonflash (firmware flashing and OTA for Klipper)" \
      "$BLOCK_END"
  } >"$TMP_DIR/block"
  if ask "Add [update_manager moonflash] (updates from $ORIGIN, branch $BRANCH) to $MOONRAKER_CONF?"; then
    cp -- "$MOONRAKER_CONF" "$TMP_DIR/moonraker.conf"
    if ends_without_newline "$TMP_DIR/moonraker.conf"; then printf '\n' >>"$TMP_DIR/moonraker.conf"; fi
    if [[ -s "$TMP_DIR/moonraker.conf" ]]; then printf '\n' >>"$TMP_DIR/moonraker.conf"; fi
    cat -- "$TMP_DIR/block" >>"$TMP_DIR/moonraker.conf"
    replace "$MOONRAKER_CONF" "$TMP_DIR/moonraker.conf"
    DONE+=("added [update_manager moonflash] to $MOONRAKER_CONF")
    RESTART_MOONRAKER=1
  else
    NEXT+=("for updates from Mainsail/Fluidd, add to the end of $MOONRAKER_CONF, then restart Moonraker:
$(sed -n '2,10s/^/      /p' -- "$TMP_DIR/block")")
  fi
fi

# ------------------------------------------------------------------------------------------------------- summary
offer_moonraker_restart
console_filters add
if ((${#DONE[@]} == 0)); then
  say "moonflash is already installed; nothing changed."
else
  say "moonflash installed (user $TARGET_USER, data $DATA_DIR):"
  for item in "${DONE[@]}"; do say "  - $item"; done
fi
print_next_and_exit
