#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of outside data (fuzz/, docs/fuzzing.md).
#
#   scripts/fuzz.sh [--seconds N] [--sanitizer address|none] [target...]
#                                     default: every target, 20 s each, AddressSanitizer
#
# Builds the targets with cargo-fuzz (under AddressSanitizer unless told otherwise), then runs each for N seconds from
# its committed seeds (fuzz/seeds/<target>/), past findings (fuzz/regressions/<target>/) and what
# earlier runs found (fuzz/corpus/<target>/).
# Exits non-zero if any target finds a crash, a panic, a timeout or an out-of-memory input, and
# prints where the reproducer was written.
set -euo pipefail
cd "$(dirname "$0")/.."

all_targets=(rtmp_session flv_tag m3u8_media m3u8_master viewer_token session_token chat_frame player_report)
seconds=20
sanitizer=address
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --sanitizer) sanitizer="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz: unknown option $1 (see --help)" >&2; exit 2 ;;
    *)
      if [[ ! " ${all_targets[*]} " == *" $1 "* ]]; then
        echo "fuzz: unknown target $1 (targets: ${all_targets[*]})" >&2
        exit 2
      fi
      targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz --locked (scripts/setup-debian.sh does it)" >&2
  exit 1
fi

# The fuzz package is outside the workspace, so `cargo fmt --all` does not look at it.
cargo fmt --manifest-path fuzz/Cargo.toml --check

# AddressSanitizer needs -Zsanitizer, which stable rustc accepts with this. It turns a stack
# overflow into a report with a saved input (without it, libFuzzer dies of a bare SIGSEGV).
export RUSTC_BOOTSTRAP=1
build_start=$(date +%s)
if [ ${#targets[@]} -eq ${#all_targets[@]} ]; then
  cargo fuzz build --fuzz-dir fuzz -s "$sanitizer"
else
  for t in "${targets[@]}"; do cargo fuzz build --fuzz-dir fuzz -s "$sanitizer" "$t"; done
fi
echo "fuzz: built in $(( $(date +%s) - build_start )) s"

bin_dir=fuzz/target/x86_64-unknown-linux-gnu/release
failed=()
for t in "${targets[@]}"; do
  case "$t" in
    m3u8_*) dict=fuzz/m3u8.dict ;;
    *_token) dict=fuzz/token.dict ;;
    *) dict=fuzz/$t.dict ;;
  esac
  args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512
        -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/")
  [ -f "$dict" ] && args+=(-dict="$dict")
  # A small stack makes unbounded recursion overflow within the default input sizes, and the
  # RTMP seeds (a whole publish) are longer than libFuzzer's default 4 KiB.
  stack=""
  case "$t" in
    rtmp_session) stack=128; args+=(-max_len=32768) ;;
    chat_frame) args+=(-max_len=5000) ;;
  esac
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log="fuzz/artifacts/$t/last-run.log"
  echo "fuzz: $t for $seconds s${stack:+ (stack $stack KiB)}"
  rc=0
  # The first directory is where libFuzzer saves new inputs; the seeds stay as committed, and
  # every input that once crashed a target (fuzz/regressions/) is replayed first.
  dirs=("fuzz/corpus/$t" "fuzz/seeds/$t")
  [ -d "fuzz/regressions/$t" ] && dirs+=("fuzz/regressions/$t")
  (if [ -n "$stack" ]; then ulimit -s "$stack"; fi; exec "$bin_dir/$t" "${args[@]}" "${dirs[@]}") \
    >"$log" 2>&1 || rc=$?
  grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)' "$log" \
    | tr '\n' ' ' | sed 's/stat:://g; s/^/      /'
  echo
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    echo "fuzz: $t FAILED (exit $rc); from $log:" >&2
    grep -E 'ERROR|panicked|deadly signal|out-of-memory|timeout|SUMMARY' "$log" | head -5 >&2 || true
    grep -E 'Test unit written to|written to' "$log" >&2 || true
    echo "      replay: (${stack:+ulimit -s $stack; }$bin_dir/$t <reproducer>)" >&2
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: findings in ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, no findings"
