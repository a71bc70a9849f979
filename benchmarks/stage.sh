# Sourced by the benchmark shell scripts once OUT is set: `stage NAME COMMAND...` runs COMMAND with its output in
# $OUT/NAME.log, then prints its wall seconds and peak memory (kept in $OUT/NAME.time). Progress bars off.
# STAGE_SKIP_DONE=1 skips a stage whose NAME.time exists (rerun a script after fixing a late stage).
export TQDM_DISABLE=1
stage() {
  local name=$1; shift
  if [[ "${STAGE_SKIP_DONE:-0}" == 1 && -f "$OUT/$name.time" ]]; then
    echo "$name: done before ($(cat "$OUT/$name.time"))"
    return
  fi
  rm -f "$OUT/$name.time"
  /usr/bin/time -f "$name: %e s wall, peak RSS %M KiB" -o "$OUT/$name.time.partial" "$@" > "$OUT/$name.log" 2>&1
  mv "$OUT/$name.time.partial" "$OUT/$name.time"
  cat "$OUT/$name.time"
}
