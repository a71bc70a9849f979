# Sourced by the benchmark shell scripts once OUT is set: `stage NAME COMMAND...` runs COMMAND with its output in
# $OUT/NAME.log, then prints its wall seconds and peak memory (kept in $OUT/NAME.time). Progress bars off.
export TQDM_DISABLE=1
stage() {
  local name=$1; shift
  /usr/bin/time -f "$name: %e s wall, peak RSS %M KiB" -o "$OUT/$name.time" "$@" > "$OUT/$name.log" 2>&1
  cat "$OUT/$name.time"
}
