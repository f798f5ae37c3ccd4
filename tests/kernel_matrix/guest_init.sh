#!/bin/sh
# Stage 2 of the kernel-matrix guest: PID 1 on the host's root filesystem (read-only 9p),
# started by stage 1 (initramfs_init.sh). Makes what the agent and the tests need (proc, sys,
# devtmpfs, tmpfs for every directory they write, tracefs, debugfs, bpffs, cgroup2, a
# modprobe that finds the Debian kernel's modules), runs the host's request
# (/run/kmatrix/out/cmd.sh, written by tests/kernel_matrix/vm.py into a writable 9p share),
# stores its stdout, stderr and exit code in that share and powers the guest off.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
OUT=/run/kmatrix/out

say() { echo "kmatrix: $*" > /dev/console; }
poweroff_now() {
	sync
	echo o > /proc/sysrq-trigger
	while :; do :; done  # the power-off is asynchronous; nothing on 9p may run meanwhile
}
die() {
	say "$*"
	echo "KMATRIX-SETUP-FAILED" > /dev/console
	poweroff_now
}

mount -t proc proc /proc || die "mount proc"
mount -t sysfs sysfs /sys || die "mount sysfs"
mount -t devtmpfs devtmpfs /dev || die "mount devtmpfs"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o ptmxmode=666 devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# Every directory something writes to: netns bind mounts and locks (/run), temp files.
for d in /run /tmp /var/tmp; do
	mount -t tmpfs -o mode=1777 tmpfs "$d" || die "tmpfs on $d"
done
mkdir -p "$OUT" /run/kmatrix/home
mount -t 9p -o trans=virtio,version=9p2000.L kmout "$OUT" || die "mount of the results share failed"

modroot=""
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	kmatrix.modroot=*) modroot="${arg#kmatrix.modroot=}" ;;
	kmatrix.repo=*) repo="${arg#kmatrix.repo=}" ;;
	esac
done
# The checkout is on the host root, unless it sits under a directory a tmpfs now hides (a
# clone in /tmp): then mount its own share there.
if [ -n "${repo:-}" ] && [ ! -e "$repo/Makefile" ]; then
	mkdir -p "$repo"
	mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose kmrepo "$repo" \
		|| die "mount of the checkout over 9p failed"
fi
[ -d "$modroot/lib/modules/$(uname -r)" ] || die "no modules for $(uname -r) under '$modroot'"
# The kernel (request_module), iptables and ip run this for every module they need.
cat > /run/kmatrix/modprobe <<EOF
#!/bin/sh
exec /usr/sbin/modprobe -d "$modroot" "\$@"
EOF
chmod 755 /run/kmatrix/modprobe
echo /run/kmatrix/modprobe > /proc/sys/kernel/modprobe

mount -t tracefs nodev /sys/kernel/tracing || die "mount tracefs"
mount -t debugfs nodev /sys/kernel/debug || die "mount debugfs"
mount -t bpf bpf /sys/fs/bpf || die "mount bpffs"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || die "mount cgroup2"
ip link set lo up
hostname kmatrix
ulimit -l unlimited

say "guest ready: $(uname -r), $(nproc) CPUs"
echo "KMATRIX-RUN" > /dev/console
(cd / && exec /bin/sh "$OUT/cmd.sh") > "$OUT/stdout" 2> "$OUT/stderr" < /dev/null
rc=$?
echo "$rc" > "$OUT/rc"
echo "KMATRIX-RC=$rc" > /dev/console
umount "$OUT"
poweroff_now
