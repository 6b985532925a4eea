#!/usr/bin/env bash
# Boot a real systemd in a container and drive overlayd@.service through it:
#   start (READY=1 once mounted; the mount visible outside the service), a saga through the
#   mount, SIGKILL of the daemon mid-saga (Restart=on-failure: dead mount cleared, journal
#   recovered, same saga, the open step's compensation command run by the hardened unit), a
#   hung daemon (SIGSTOP: the watchdog restarts it), a commit, a clean stop
#   (STOPPING=1, unmounted, exit 0), a configuration error (exit 2, not restarted), and the
#   unprivileged user unit through fusermount3.
#
# Needs root, debootstrap and systemd-nspawn (Debian: apt-get install debootstrap
# systemd-container), and network access to a Debian mirror (DEBIAN_MIRROR) and to PyPI.
# Not run by CI: the first run takes a few minutes (debootstrap, building pyfuse3); the
# container is kept in DIR and reused, a second run takes about two minutes.
#
# Usage: systemd/test-in-nspawn.sh [DIR]     (default /var/tmp/overlayd-nspawn)
# Exit status 0 when every check passed; the container's log is DIR/e2e.log.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-/var/tmp/overlayd-nspawn}
ROOTFS=$DIR/rootfs
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=systemd,systemd-sysv,dbus,libpam-systemd,fuse3,python3,python3-venv,ca-certificates,util-linux
BUILD_PACKAGES="libfuse3-dev pkg-config gcc python3-dev"  # for pyfuse3; apt resolves their virtual dependencies

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
for tool in debootstrap systemd-nspawn; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install debootstrap systemd-container" >&2; exit 2; }
done
[ -c /dev/fuse ] || { echo "/dev/fuse is missing (modprobe fuse)" >&2; exit 2; }

say() { printf '\n### %s (%ds)\n' "$*" "$SECONDS"; }
nspawn() { systemd-nspawn -q -D "$ROOTFS" --register=no --keep-unit --bind=/dev/fuse "$@"; }

mkdir -p "$DIR"
if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
  say "debootstrap bookworm into $ROOTFS"
  rm -rf "$ROOTFS.tmp"
  debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOTFS.tmp" "$MIRROR" >"$DIR/debootstrap.log" 2>&1 \
    || { tail -20 "$DIR/debootstrap.log"; exit 1; }
  echo overlayd-test >"$ROOTFS.tmp/etc/hostname"
  systemd-nspawn -q -D "$ROOTFS.tmp" --register=no --keep-unit --pipe /bin/sh -c \
    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $BUILD_PACKAGES" \
    >>"$DIR/debootstrap.log" 2>&1 || { tail -20 "$DIR/debootstrap.log"; exit 1; }
  mv "$ROOTFS.tmp" "$ROOTFS"
fi

say "copy the working tree to /opt/overlayd and install it in /opt/venv"
rm -rf "$ROOTFS/opt/overlayd"
mkdir -p "$ROOTFS/opt/overlayd"
(cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -C "$ROOTFS/opt/overlayd" -xf -
# pip inside uses the host's CA bundle, which knows any TLS proxy the host trusts
nspawn --pipe --bind-ro=/etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt --setenv=PIP_CERT=/run/host-ca.crt \
  /bin/sh -c '
  set -e
  [ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv
  /opt/venv/bin/pip install -q --disable-pip-version-check -e /opt/overlayd' >"$DIR/pip.log" 2>&1 \
  || { tail -30 "$DIR/pip.log"; exit 1; }

say "install the units, a workspace and the test that runs inside the container"
rm -rf "$ROOTFS/etc/overlayd" "$ROOTFS/var/lib/overlayd" "$ROOTFS/srv/base" "$ROOTFS/mnt/ws" "$ROOTFS/var/tmp/e2e".* "$ROOTFS/var/tmp/e2e-compensated" \
  "$ROOTFS/home/tester" "$ROOTFS"/var/log/journal/*  # a fresh start: no state, no journal of an earlier run
mkdir -p "$ROOTFS/srv/base/src" "$ROOTFS/mnt/ws"
echo "print('hello')" >"$ROOTFS/srv/base/src/main.py"
nspawn --pipe /opt/venv/bin/overlayd install-service --name ws --base /srv/base --mountpoint /mnt/ws
cat >"$ROOTFS/usr/local/sbin/overlayd-e2e" <<'INNER'
#!/bin/bash
# Runs inside the booted container (overlayd-e2e.service); the result goes to /var/tmp/e2e.rc.
set -uo pipefail
exec > >(tee /var/tmp/e2e.log) 2>&1
export PATH=/opt/venv/bin:$PATH
U=overlayd@ws
say() { printf '\n=== %s\n' "$*"; }
fail() {
  echo "FAIL: $*"
  systemctl status --no-pager "$U" | head -20
  journalctl --no-pager -o short-monotonic -u "$U" | tail -40
  echo 1 >/var/tmp/e2e.rc
  exit 1
}
prop() { systemctl show -P "$1" "${2:-$U}"; }
wait_restarts() {  # N: wait until the unit was restarted N times and is active again
  for _ in $(seq 120); do
    [ "$(prop NRestarts)" = "$1" ] && systemctl is-active -q "$U" && return 0
    sleep 1
  done
  fail "no restart number $1 (NRestarts=$(prop NRestarts), $(prop ActiveState)/$(prop SubState))"
}
saga_json() { saga -w /mnt/ws status --json; }

say "systemd $(systemctl --version | head -1): start $U"
systemctl start "$U" || fail "systemctl start"
# Type=notify: start returned after READY=1, so the mount must be there, seen from outside the service
findmnt /mnt/ws || fail "the mount is not visible outside the service"
[ "$(prop StatusText)" = mounted ] || fail "StatusText is $(prop StatusText)"
grep -q hello /mnt/ws/src/main.py || fail "cannot read through the mount"
systemctl show -p MainPID -p NotifyAccess -p WatchdogUSec -p CapabilityBoundingSet "$U"

say "a saga through the mount"
cd /mnt/ws || fail "cd /mnt/ws"
# the second step's compensation runs in the hardened unit when the crash below rolls it back
saga begin nspawn-demo && saga step first && echo one >first.txt \
  && saga step second --compensate 'echo compensated >/var/tmp/e2e-compensated' && echo two >second.txt \
  || fail "saga commands"
cd /
before=$(saga_json) || fail "saga status"
echo "$before"

say "SIGKILL mid-saga: Restart=on-failure"
old=$(prop MainPID)
systemctl kill -s SIGKILL --kill-whom=main "$U"
wait_restarts 1
[ "$(prop MainPID)" != "$old" ] || fail "same main pid after the restart"
findmnt /mnt/ws || fail "not mounted after the restart"
for _ in $(seq 50); do after=$(saga_json) && python3 -c 'import json,sys; s=json.loads(sys.argv[1]); sys.exit(s.get("busy") is not None)' "$after" && break; sleep 0.2; done
echo "$after"
python3 - "$before" "$after" <<'PY' || fail "the saga changed across the crash"
import json, sys
b, a = (json.loads(x) for x in sys.argv[1:])
assert a["saga"]["id"] == b["saga"]["id"] and a["saga"]["state"] == "active", a
assert [s["state"] for s in a["steps"]] == ["done", "compensated"], a["steps"]
PY
[ "$(cat /mnt/ws/first.txt)" = one ] || fail "the done step's file is gone"
[ ! -e /mnt/ws/second.txt ] || fail "the open step was not rolled back"
[ "$(cat /var/tmp/e2e-compensated)" = compensated ] || fail "the compensation command did not run"
[ "$(stat -c %a /var/tmp/e2e-compensated)" = 644 ] || fail "the compensation did not get the client's umask 022"
journalctl --no-pager -u "$U" | grep -E "cleared a dead mount|recover|rolling back" || true

say "a hung daemon: WatchdogSec=30, then SIGABRT, TimeoutAbortSec=30, SIGKILL, restart"
systemctl kill -s SIGSTOP --kill-whom=main "$U"
wait_restarts 2
journalctl --no-pager -u "$U" | grep -i "watchdog timeout" || fail "no watchdog timeout in the journal"
findmnt /mnt/ws || fail "not mounted after the watchdog restart"
saga -w /mnt/ws status >/dev/null || fail "saga status after the watchdog restart"

say "a commit from the hardened unit"
saga -w /mnt/ws step third && echo three >/mnt/ws/third.txt && saga -w /mnt/ws commit || fail "commit"
[ "$(cat /srv/base/first.txt)$(cat /srv/base/third.txt)" = onethree ] || fail "the commit did not reach the base"
systemd-analyze security "$U" | tail -1

say "clean stop: STOPPING=1, unmounted, exit 0"
systemctl stop "$U" || fail "systemctl stop"
findmnt /mnt/ws && fail "still mounted after stop"
[ "$(prop Result)" = success ] || fail "Result=$(prop Result)"
[ "$(prop ExecMainStatus)" = 0 ] || fail "exit status $(prop ExecMainStatus)"
journalctl --no-pager -o short-monotonic -u "$U" | tail -8
echo "warnings and errors (journald priorities from the <N> prefixes):"
journalctl --no-pager -p warning -u "$U" | tail -8

say "a configuration error exits 2 and is not restarted"
cp /etc/overlayd/ws.conf /etc/overlayd/bad.conf && echo 'mount_point = "/x"' >>/etc/overlayd/bad.conf
systemctl start overlayd@bad && fail "a bad configuration started"
sleep 5
[ "$(prop NRestarts overlayd@bad)" = 0 ] || fail "a configuration error was restarted"
[ "$(prop ExecMainStatus overlayd@bad)" = 2 ] || fail "exit status $(prop ExecMainStatus overlayd@bad), not 2"
journalctl --no-pager -p err -u overlayd@bad | grep "unknown key 'mount_point'" || fail "the error is not in the journal at priority err"

say "the user unit, through fusermount3"
# libfuse opens /dev/fuse as the user before calling fusermount3: it must be mode 0666, as
# udev makes it on Debian; the node bound from a host without udev may be 0600.
if [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  umount /dev/fuse 2>/dev/null; rm -f /dev/fuse; mknod -m 0666 /dev/fuse c 10 229 || fail "mknod /dev/fuse"
fi
id tester >/dev/null 2>&1 || useradd tester
mkdir -p /home/tester && chown tester: /home/tester
mkdir -p /home/tester/base /home/tester/mnt && echo mine >/home/tester/base/file && chown -R tester: /home/tester/base /home/tester/mnt
runuser -u tester -- /opt/venv/bin/overlayd install-service --user --name uws --base /home/tester/base --mountpoint /home/tester/mnt
loginctl enable-linger tester || fail "enable-linger"
for _ in $(seq 30); do [ -S /run/user/$(id -u tester)/systemd/private ] && break; sleep 1; done
as_tester() { runuser -u tester -- env XDG_RUNTIME_DIR=/run/user/$(id -u tester) "$@"; }
as_tester systemctl --user daemon-reload
as_tester systemctl --user start overlayd-user@uws || { as_tester journalctl --user --no-pager -u overlayd-user@uws | tail -20; fail "user unit start"; }
findmnt /home/tester/mnt || fail "the user's mount is not visible"
[ "$(as_tester cat /home/tester/mnt/file)" = mine ] || fail "cannot read the user's mount"
as_tester saga -w /home/tester/mnt begin user-saga && as_tester saga -w /home/tester/mnt step one || fail "user saga"
as_tester systemctl --user kill -s SIGKILL --kill-whom=main overlayd-user@uws
restarted=no
for _ in $(seq 60); do
  [ "$(as_tester systemctl --user show -P NRestarts overlayd-user@uws)" = 1 ] \
    && as_tester systemctl --user is-active -q overlayd-user@uws && restarted=yes && break
  sleep 1
done
[ $restarted = yes ] || fail "the user unit was not restarted after SIGKILL"
findmnt /home/tester/mnt || fail "the user's mount is not back after the restart"
as_tester saga -w /home/tester/mnt status | grep -q user-saga || fail "the user saga is gone after a crash"
as_tester systemctl --user stop overlayd-user@uws || fail "user unit stop"
findmnt /home/tester/mnt && fail "the user's mount is still there after stop"

say "ALL PASSED"
echo 0 >/var/tmp/e2e.rc
INNER
chmod 755 "$ROOTFS/usr/local/sbin/overlayd-e2e"
cat >"$ROOTFS/etc/systemd/system/overlayd-e2e.service" <<'UNIT'
[Unit]
Description=overlayd end-to-end test under systemd
After=multi-user.target systemd-logind.service
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/overlayd-e2e
TimeoutStartSec=600
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$ROOTFS/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/overlayd-e2e.service "$ROOTFS/etc/systemd/system/multi-user.target.wants/"

say "boot the container"
timeout 900 systemd-nspawn -q -D "$ROOTFS" --register=no --keep-unit --bind=/dev/fuse --boot \
  --console=pipe </dev/null >"$DIR/boot.log" 2>&1 || true
cp "$ROOTFS/var/tmp/e2e.log" "$DIR/e2e.log" 2>/dev/null || { echo "the test did not run; see $DIR/boot.log" >&2; tail -30 "$DIR/boot.log" >&2; exit 1; }
cat "$DIR/e2e.log"
rc=$(cat "$ROOTFS/var/tmp/e2e.rc" 2>/dev/null || echo 1)
say "done: exit $rc"
exit "$rc"
