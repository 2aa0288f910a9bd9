# Sourced by images/build.sh and the image tests' helpers: podman flags that work on this kind of
# machine. crun refuses hybrid cgroup v1 hosts ("cgroups in hybrid mode not supported"), runc does
# not; a container may not raise rlimits above the host's, so they are set to values at or below them.
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] || [ "$nofile" -gt 1024 ] && nofile=1024
[ "$nproc" = unlimited ] || [ "$nproc" -gt 1024 ] && nproc=1024
KUBETUNE_PODMAN_RUN_FLAGS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
if command -v runc >/dev/null; then KUBETUNE_PODMAN_RUN_FLAGS=(--runtime "${KUBETUNE_OCI_RUNTIME:-runc}" "${KUBETUNE_PODMAN_RUN_FLAGS[@]}"); fi
