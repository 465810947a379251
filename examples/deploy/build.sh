#!/usr/bin/env bash
# The build steps of the Dockerfile, as a script: the image runs exactly this, and it runs
# here without a container engine (see the README, "Install and deploy").
#
#   examples/deploy/build.sh OUT_DIR
#
# builds the stripped release binary and the guest modules, lays them out in OUT_DIR as the
# image's filesystem (usr/local/bin/mailroom, opt/mailroom/{mailroom.toml,modules/*.wasm}),
# and checks the result with `mailroom validate`, which compiles every module.
set -euo pipefail
out="${1:?usage: build.sh OUT_DIR}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"

rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --locked --release -p mailroom
cargo build --locked --release --target wasm32-wasip2 -p enrich -p counter -p flaky -p noop

mkdir -p "$out/usr/local/bin" "$out/opt/mailroom/modules"
install -m 0755 "$target/release/mailroom" "$out/usr/local/bin/mailroom"
for guest in enrich counter flaky noop; do
  install -m 0644 "$target/wasm32-wasip2/release/$guest.wasm" "$out/opt/mailroom/modules/"
done
install -m 0644 examples/deploy/mailroom.toml "$out/opt/mailroom/mailroom.toml"

# Compiles every module against the handler world; no NATS needed.
XDG_CACHE_HOME="$(mktemp -d)" "$out/usr/local/bin/mailroom" validate \
  --config "$out/opt/mailroom/mailroom.toml"
ls -l "$out/usr/local/bin/mailroom" "$out/opt/mailroom/modules"
