# Shared shell helpers for packaging/* scripts (sourced, not run).
# Foreign-architecture Debian roots: debootstrap + qemu-user-static through binfmt_misc.

ROOTFS_CACHE=${SMQ_ROOTFS_CACHE:-/var/cache/smq-pex}
DEBIAN_MIRROR=${SMQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The version in smq/__init__.py (the PEX files' names carry it).
smq_version() { sed -n 's/^__version__ = "\(.*\)"/\1/p' smq/__init__.py; }

need_root() {
  [ "$(id -u)" = 0 ] || die "$1 needs root (debootstrap, chroot, binfmt_misc)"
}

# Debian architecture name -> qemu's binfmt name.
qemu_name() {
  case "$1" in
    arm64) echo aarch64 ;;
    armhf) echo arm ;;
    *) die "unsupported architecture $1" ;;
  esac
}

# Install debootstrap and qemu-user-static (+ binfmt-support) from Debian if missing.
ensure_host_tools() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  command -v unshare >/dev/null || missing+=(util-linux)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# Make the kernel run foreign ELF binaries through qemu. The F flag (fix binary)
# makes the kernel open the interpreter at registration, so it also works inside a
# chroot that has no qemu binary of its own. Without this the PEX cannot re-exec itself.
ensure_binfmt() {
  local name
  name=$(qemu_name "$1")
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
      || die "cannot mount binfmt_misc (is this a container without CAP_SYS_ADMIN?)"
  fi
  if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$name" ]; then
    update-binfmts --enable "qemu-$name" >/dev/null 2>&1 || true
  fi
  if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$name" ]; then
    update-binfmts --import "qemu-$name" >/dev/null 2>&1 || true
    update-binfmts --enable "qemu-$name" >/dev/null 2>&1 || true
  fi
  grep -q '^enabled' "/proc/sys/fs/binfmt_misc/qemu-$name" 2>/dev/null \
    || die "qemu-$name is not registered in binfmt_misc"
  grep -q '^flags:.*F' "/proc/sys/fs/binfmt_misc/qemu-$name" \
    || die "qemu-$name is registered without the F flag: chroots cannot use it"
}

# ensure_rootfs ARCH SUITE -> prints the root's path. Built once with debootstrap
# (minbase + python3) and kept in $ROOTFS_CACHE; a root only counts once complete.
ensure_rootfs() {
  local arch=$1 suite=$2 root="$ROOTFS_CACHE/$2-$1"
  local stamp="$root/.smq-rootfs-complete"
  if [ -f "$stamp" ]; then
    log "using cached $suite/$arch root $root"
  else
    mkdir -p "$ROOTFS_CACHE"
    rm -rf "$root.tmp"
    log "building $suite/$arch root with debootstrap (a few minutes; cached in $root)"
    debootstrap --arch="$arch" --variant=minbase --include=python3 \
      "$suite" "$root.tmp" "$DEBIAN_MIRROR" >"$ROOTFS_CACHE/$suite-$arch.debootstrap.log" 2>&1 \
      || die "debootstrap failed; see $ROOTFS_CACHE/$suite-$arch.debootstrap.log"
    date -u +%FT%TZ >"$root.tmp/.smq-rootfs-complete"
    rm -rf "$root"
    mv "$root.tmp" "$root"
  fi
  echo "$root"
}

# in_root ROOT CMD... : run CMD chrooted in ROOT with /proc and /dev, in a private
# mount namespace (the mounts vanish with the process: nothing to clean up, and the
# cached root never keeps a live /dev mount). exec all the way down: the PID is CMD's.
in_root() {
  local root=$1
  shift
  exec unshare --mount --propagation private -- /bin/sh -c '
    root=$1; shift
    mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev" || exit 97
    exec chroot "$root" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 "$@"
  ' in_root "$root" "$@"
}

# -- a Debian 12 amd64 VM under qemu (packaging/verify-systemd, packaging/verify-powercut) --

# vm_pex [FILE] -> FILE, or this checkout's x86_64 PEX (built if missing): what the VM runs.
vm_pex() {
  local pex=${1:-dist/smq-$(smq_version)-linux-x86_64.pex}
  [ -f "$pex" ] || { log "building the PEX"; packaging/build-pex --arch x86_64 >&2; }
  echo "$pex"
}

# Install debootstrap, qemu-system-x86 and e2fsprogs (mkfs.ext4 -d, debugfs) if missing.
ensure_vm_tools() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  command -v debugfs >/dev/null || missing+=(e2fsprogs)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# ensure_vm_root [NAME PACKAGE,...] -> prints the path of the VM's root: systemd as init,
# python3 for the PEX, Debian's kernel and initramfs (and with NAME, the extra packages:
# a root of its own, e.g. podman for packaging/verify-oci). Built once with debootstrap,
# kept in $ROOTFS_CACHE.
ensure_vm_root() {
  local name=${1:-vm} extra=${2:+,$2}
  local root="$ROOTFS_CACHE/bookworm-amd64-$name"
  if [ ! -f "$root/.smq-rootfs-complete" ]; then
    log "building the VM root with debootstrap (a few minutes; cached in $root)"
    mkdir -p "$ROOTFS_CACHE"
    rm -rf "$root.tmp"
    debootstrap --arch=amd64 --variant=minbase \
      --include="systemd,systemd-sysv,dbus,udev,kmod,procps,python3,linux-image-amd64,initramfs-tools$extra" \
      bookworm "$root.tmp" "$DEBIAN_MIRROR" >"$ROOTFS_CACHE/bookworm-amd64-$name.debootstrap.log" 2>&1 \
      || die "debootstrap failed; see $ROOTFS_CACHE/bookworm-amd64-$name.debootstrap.log"
    echo smq-vm >"$root.tmp/etc/hostname"
    echo "/dev/vda / ext4 defaults 0 1" >"$root.tmp/etc/fstab"
    date -u +%FT%TZ >"$root.tmp/.smq-rootfs-complete"
    rm -rf "$root"
    mv "$root.tmp" "$root"
  fi
  echo "$root"
}

# vm_disk ROOT OVERLAY IMAGE: a 3 GiB ext4 image of ROOT with OVERLAY's files added on
# top (copied into a scratch tree beside IMAGE: the cached root is never changed).
vm_disk() {
  local root=$1 overlay=$2 image=$3 scratch
  scratch=$(mktemp -d "$(dirname "$image")/root.XXXXXX")
  cp -a "$root/." "$scratch/" && cp -a "$overlay/." "$scratch/" \
    && truncate -s 3G "$image" && mkfs.ext4 -q -F -d "$scratch" "$image"
  local status=$?
  rm -rf "$scratch"
  return $status
}

