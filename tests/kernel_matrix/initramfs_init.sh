#!/bin/busybox sh
# Stage 1 of the kernel-matrix guest, PID 1 inside the initramfs (busybox only): load the
# virtio + 9p modules packed next to this script, mount the host's root filesystem (shared
# read-only by qemu as "hostroot") and hand PID 1 to stage 2, a script on that filesystem
# named by kmatrix.stage2= on the kernel command line (tests/kernel_matrix/guest_init.sh).
/bin/busybox mkdir -p /bin /proc /dev /newroot
/bin/busybox --install -s /bin
export PATH=/bin

die() {
	echo "kmatrix stage1: $*" > /dev/console
	echo "KMATRIX-STAGE1-FAILED" > /dev/console
	echo o > /proc/sysrq-trigger
	sleep 60
}

mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev

for m in $(cat /modules.order); do
	insmod "/modules/$m" || die "insmod $m"
done

stage2=""
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	kmatrix.stage2=*) stage2="${arg#kmatrix.stage2=}" ;;
	esac
done
[ -n "$stage2" ] || die "no kmatrix.stage2= on the kernel command line"

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /newroot \
	|| die "mount of the host root over 9p failed"
[ -f "/newroot$stage2" ] || die "stage 2 $stage2 not found on the host root"

umount /dev
umount /proc
exec switch_root /newroot /bin/sh "$stage2"
