#!/sluice/busybox sh
# PID 1 of a Sluice VM test run (written into the initramfs by `cargo xtask integration-test
# --vm`). It mounts what the privileged tests need, loads the modules, runs each test
# executable, and powers off. Its report goes to the second serial port (the host reads it):
#   @@sluice-vm kernel <release>        @@sluice-vm module-failed <file>
#   @@sluice-vm start <label>           ...the executable's libtest output...
#   @@sluice-vm exit <label> <status>   @@sluice-vm done
# Everything else (kernel messages, the tests' stderr) goes to the console, a log on the host.
/sluice/busybox --install -s
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# /run is a real tmpfs and /var/run a symlink to it: netns mounts under /run/netns must be
# seen through both paths (a bind mount of /run would not carry them).
mount -t tmpfs -o mode=0755 tmpfs /run
# /tmp stays the initramfs's own (writable) directory: a checkout under /tmp carries the
# test executables there.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# Cgroup v1 hierarchies too, as on the hybrid nodes kubelets still run on (cgroupfs and systemd
# drivers): the /proc scan must find pods in either.
mkdir -p /run/cgroup-v1/pids /run/cgroup-v1/systemd
mount -t cgroup -o pids cgroup /run/cgroup-v1/pids
mount -t cgroup -o none,name=systemd cgroup /run/cgroup-v1/systemd
mount -t bpf -o mode=0700 bpf /sys/fs/bpf

stty -F /dev/ttyS1 raw -echo
exec 3>/dev/ttyS1
say() { echo "@@sluice-vm $*" >&3; }
say kernel "$(uname -r)"

for ko in $(cat /sluice/load-order); do
    insmod "$ko" || say module-failed "$ko"
done
ip link set lo up

# CI, RUST_BACKTRACE, TEST_THREADS, BINARY_TIMEOUT, and `set --` with the libtest arguments.
. /sluice/env
tab=$(printf '\t')
while IFS="$tab" read -r label exe; do
    say start "$label"
    cd /tmp
    timeout -s KILL "$BINARY_TIMEOUT" "$exe" --test-threads="$TEST_THREADS" "$@" </dev/null >&3
    say exit "$label" "$?"
    # Nothing may outlive its executable into the next one (PID 1 itself survives this).
    kill -9 -1 2>/dev/null
done </sluice/tests
say done
sync
reboot -f
