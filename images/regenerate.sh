#!/usr/bin/env bash
# Regenerates every committed sample image in images/ plus its qemu-img oracle files.
# Requires qemu-img / qemu-io / qemu-nbd (tested with Debian qemu-utils 7.2) and node >= 20.
# See images/README.md for what each sample contains.
#
# Determinism: all data comes from qemu-io patterns or patch.mjs fill-random (seeded), snapshot
# dates are patched to fixed values, sparse holes are filled (cp --sparse=never) before the
# oracles are computed (git checkouts are never sparse, and qemu-img map looks at holes), and
# gzip runs with -n. Two runs on the same qemu version produce byte-identical images; only
# "actual-size" in *.info.json / "disk size" in *.info.txt depend on the filesystem.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
export TZ=UTC LC_ALL=C
ulimit -c 0 # lazy-dirty.qcow2 is made with qemu-io's "abort" command

for t in qemu-img qemu-io qemu-nbd node gzip; do
  command -v "$t" >/dev/null || { echo "regenerate.sh: $t not found" >&2; exit 1; }
done

# --- clean everything except the sources of this directory -------------------------------------
find . -mindepth 1 -maxdepth 1 \
  ! -name regenerate.sh ! -name README.md ! -name patch.mjs ! -name oracle.mjs ! -name .gitattributes \
  -exec rm -rf {} +

SAMPLES="$(mktemp)"
trap 'rm -f "$SAMPLES"' EXIT

# sample PATH FLAGS DESCRIPTION   (FLAGS: comma list, see oracle.mjs)
sample() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$SAMPLES"; }
mk() { qemu-img create -q -f qcow2 "$@"; }
# io FILE CMD... : one qemu-io session running every CMD in order
# (qemu-io 7.2 does not accept expressions such as 1M+8k: offsets are plain numbers or N[kKMG])
io() {
  local f=$1; shift
  local args=() out
  for c in "$@"; do args+=(-c "$c"); done
  if ! out="$(qemu-io -f qcow2 "${args[@]}" "$f" 2>&1)"; then
    printf 'regenerate.sh: qemu-io %s failed:\n%s\n' "$f" "$out" >&2
    return 1
  fi
}
P() { node "$HERE/patch.mjs" "$@"; }

# --- base.qcow2: the demo image --------------------------------------------------------------------
mk -o cluster_size=64k base.qcow2 64M
io base.qcow2 'write -P 0x11 0 64k' 'write -P 0x22 1M 4k' 'write -P 0x33 32M 64k'
sample base.qcow2 valid "v3, 64 KiB clusters, 64 MiB; 0x11 @ [0,64k), 0x22 @ [1M,1M+4k) (partial cluster), 0x33 @ [32M,32M+64k)"

# --- format variants -------------------------------------------------------------------------------
mk -o compat=0.10,cluster_size=16k v2.qcow2 16M
io v2.qcow2 'write -P 0x5a 0 32k' 'write -z 8k 4k' 'write -P 0x5b 2M 8k' 'write -z 4M 64k'
sample v2.qcow2 valid "v2 (compat=0.10), 16 KiB clusters, 16 MiB; 0x5a @ [0,32k) then write -z [8k,12k) (v2 has no zero flag: zeros are written as data), 0x5b @ [2M,+8k), write -z [4M,+64k) on a never-written range (stays unallocated)"

mk -o cluster_size=512 c512.qcow2 4M
io c512.qcow2 'write -P 0x01 0 512' 'write -P 0x02 1536 1024' 'write -P 0x03 1M 64k' 'write -P 0x04 3000 100' 'write -z 1056768 1k' 'discard 1064960 512'
sample c512.qcow2 valid "v3, 512 B clusters (64-entry L2 tables, L2 spans 32 KiB), 4 MiB; small and unaligned writes, a 64 KiB write crossing L2 tables, write -z and discard inside it"

mk -o cluster_size=2M c2m.qcow2 64M
io c2m.qcow2 'write -P 0x21 0 4k' 'write -P 0x22 3M 64k' 'write -z 8M 2M' 'write -P 0x23 12M 2M' 'write -z -u 12M 2M'
sample c2m.qcow2 valid,gz "v3, 2 MiB clusters, 64 MiB; 0x21 @ [0,4k), 0x22 @ [3M,+64k), write -z [8M,10M), 0x23 [12M,14M) then write -z -u over it. Stored gzipped (14 MiB of mostly zeros): c2m.qcow2.gz"

mk -o cluster_size=4k,refcount_bits=1 rc1.qcow2 8M
io rc1.qcow2 'write -P 0x31 0 16k' 'write -P 0x32 1M 4k' 'discard 4k 4k' 'write -P 0x33 6M 8k'
sample rc1.qcow2 valid "v3, refcount_bits=1, 4 KiB clusters, 8 MiB; writes at 0/1M/6M, discard [4k,8k) frees a cluster"

mk -o cluster_size=16k,refcount_bits=64 rc64.qcow2 8M
io rc64.qcow2 'write -P 0x41 0 32k' 'write -P 0x42 2M 4k' 'write -z 16k 16k' 'write -P 0x43 7M 16k'
sample rc64.qcow2 valid "v3, refcount_bits=64, 16 KiB clusters, 8 MiB; writes at 0/2M/7M, write -z [16k,32k) (preallocated zero)"

mk -o cluster_size=64k,extended_l2=on extl2.qcow2 16M
io extl2.qcow2 'write -P 0x11 0 4k' 'write -P 0x22 8k 2k' 'write -z 10k 4k' 'write -P 0x33 64k 64k' \
  'write -z 256k 8k' 'write -P 0x44 512k 32k' 'write -z -u 512k 8k' 'discard 528k 2k'
sample extl2.qcow2 valid "v3, extended_l2=on, 64 KiB clusters (2 KiB subclusters), 16 MiB; subcluster writes leaving unallocated subclusters, write -z on subclusters (allocated and unallocated clusters), write -z -u and discard of subclusters"

mk -o cluster_size=4k,lazy_refcounts=on lazy.qcow2 8M
io lazy.qcow2 'write -P 0x51 0 8k' 'write -P 0x52 4M 4k'
sample lazy.qcow2 valid "v3, lazy_refcounts=on, 4 KiB clusters, 8 MiB, cleanly closed (dirty bit clear)"

mk -o cluster_size=4k,lazy_refcounts=on lazy-dirty.qcow2 8M
# (in a child shell so that bash's "Aborted" job message goes to /dev/null too)
bash -c "ulimit -c 0; qemu-io -t writethrough -f qcow2 -c 'write -P 0x53 0 16k' -c abort lazy-dirty.qcow2; exit 0" >/dev/null 2>&1
sample lazy-dirty.qcow2 broken "lazy_refcounts=on, 4 KiB clusters, 8 MiB; qemu-io wrote 0x53 @ [0,16k) then abort(): dirty bit set, data-cluster refcounts never written (check: 4 x refcount=0 reference=1 + OFLAG_COPIED, exit 2)"

mk -o cluster_size=4k zeros.qcow2 16M
io zeros.qcow2 'write -P 0x61 0 64k' 'write -z 8k 8k' 'write -z -u 24k 8k' 'discard 40k 8k' 'write -z 1M 16k' \
  'write -z -u 2M 4k' 'discard 3M 4k' 'write -P 0x62 4M 8k' 'write -z 4196352 1k'
sample zeros.qcow2 valid "v3, 4 KiB clusters, 16 MiB; 0x61 @ [0,64k) then write -z [8k,16k) (zero, preallocated), write -z -u [24k,32k) and discard [40k,48k) (zero, plain); write -z / -z -u / discard on never-written ranges; sub-cluster write -z inside data"

# --- compressed ------------------------------------------------------------------------------------
RAW="$(mktemp --suffix=.raw)"
trap 'rm -f "$SAMPLES" "$RAW"' EXIT
qemu-img create -q -f raw "$RAW" 1M
qemu-io -f raw -c 'write -P 0x71 0 128k' -c 'write -P 0x72 192k 4k' -c 'write -P 0x73 512k 64k' "$RAW" >/dev/null
P fill-random "$RAW" 256k 64k compressed
qemu-img convert -q -f raw -O qcow2 -c -o cluster_size=64k "$RAW" compressed-zlib.qcow2
qemu-img convert -q -f raw -O qcow2 -c -o cluster_size=16k,compression_type=zstd "$RAW" compressed-zstd.qcow2
desc_c="1 MiB, qemu-img convert -c from a raw with 0x71 @ [0,128k), 0x72 @ [192k,+4k), pseudo-random [256k,320k) (incompressible: stored uncompressed), 0x73 @ [512k,576k)"
sample compressed-zlib.qcow2 valid "compression_type=zlib (deflate), 64 KiB clusters; $desc_c"
sample compressed-zstd.qcow2 valid "compression_type=zstd (incompatible bit 3), 16 KiB clusters; $desc_c"

# --- backing chains --------------------------------------------------------------------------------
mkdir -p chain/sub
mk -o cluster_size=16k chain/base.qcow2 8M
io chain/base.qcow2 'write -P 0x01 0 128k' 'write -P 0x04 6M 16k'
mk -o cluster_size=4k -b base.qcow2 -F qcow2 chain/mid.qcow2
io chain/mid.qcow2 'write -P 0x02 64k 64k' 'write -z 192k 8k' 'write -P 0x05 1M 4k'
mk -o cluster_size=4k -b ../mid.qcow2 -F qcow2 chain/sub/top.qcow2
io chain/sub/top.qcow2 'write -P 0x03 100k 10k' 'discard 120k 4k' 'write -z -u 6M 4k'
sample chain/base.qcow2 valid "chain bottom: 16 KiB clusters, 8 MiB; 0x01 @ [0,128k), 0x04 @ [6M,+16k)"
sample chain/mid.qcow2 valid,chain "chain middle: 4 KiB clusters, backing 'base.qcow2' (-F qcow2); 0x02 @ [64k,128k), write -z [192k,200k), 0x05 @ [1M,+4k)"
sample chain/sub/top.qcow2 valid,chain "chain top: 4 KiB clusters, backing '../mid.qcow2' (-F qcow2); 0x03 @ [100k,110k) (unaligned), discard [120k,124k) and write -z -u [6M,+4k) hide the lower layers"

mkdir -p rawback
qemu-img create -q -f raw rawback/base.raw 128k
qemu-io -f raw -c 'write -P 0x81 0 128k' -c 'write -P 0x82 64k 4k' rawback/base.raw >/dev/null
mk -o cluster_size=4k -b base.raw -F raw rawback/over.qcow2 1M
io rawback/over.qcow2 'write -P 0x83 8k 4k' 'write -z 16k 8k' 'discard 32k 4k' 'write -P 0x84 98816 1k' 'write -P 0x85 512k 4k'
sample rawback/base.raw raw "raw backing file, 128 KiB: 0x81 everywhere except 0x82 @ [64k,68k)"
sample rawback/over.qcow2 valid,chain "4 KiB clusters, 1 MiB (larger than its 128 KiB raw backing 'base.raw', -F raw); 0x83 @ [8k,12k), write -z [16k,24k), discard [32k,36k), 0x84 @ [96k+512,+1k) (COW from backing), 0x85 @ [512k,+4k) past the backing's end"

# --- bitmaps ---------------------------------------------------------------------------------------
mk -o cluster_size=4k bitmaps.qcow2 16M
io bitmaps.qcow2 'write -P 0x91 0 64k'
qemu-img bitmap --add bitmaps.qcow2 b0
qemu-img bitmap --add -g 64k bitmaps.qcow2 b1
qemu-img bitmap --add bitmaps.qcow2 b2
io bitmaps.qcow2 'write -P 0x92 1M 8k' 'write -z 4M 4k'
qemu-img bitmap --disable bitmaps.qcow2 b2
io bitmaps.qcow2 'discard 32k 4k' 'write -P 0x93 8392704 4k'
sample bitmaps.qcow2 valid,bitmaps "4 KiB clusters, 16 MiB; 0x91 @ [0,64k) before any bitmap; b0 (auto, 4 KiB granularity), b1 (auto, -g 64k) and b2 added; write 0x92 @ [1M,+8k), write -z [4M,+4k); b2 disabled; discard [32k,+4k), 0x93 @ [8M+4k,+4k). Dirty ranges per bitmap (via qemu-nbd -B + x-dirty-bitmap) in bitmaps.qcow2.dirty.json"

# --- internal snapshots ----------------------------------------------------------------------------
mk -o cluster_size=4k snapshots.qcow2 8M
io snapshots.qcow2 'write -P 0xa1 0 16k' 'write -P 0xa2 1M 4k'
qemu-img snapshot -c s1 snapshots.qcow2
io snapshots.qcow2 'write -P 0xb1 4k 4k' 'write -P 0xb2 2M 8k'
qemu-img snapshot -c s2 snapshots.qcow2
io snapshots.qcow2 'write -P 0xc1 0 4k' 'discard 1M 4k' 'write -P 0xc2 2M 4k'
P snapshot-dates snapshots.qcow2 1700000000
sample snapshots.qcow2 valid "4 KiB clusters, 8 MiB, 2 internal snapshots (dates patched to 1700000000 / +60 s). s1: 0xa1 @ [0,16k), 0xa2 @ [1M,+4k); s2: s1 + 0xb1 @ [4k,8k), 0xb2 @ [2M,+8k); active: s2 + 0xc1 @ [0,4k), discard [1M,+4k), 0xc2 @ [2M,+4k)"

# --- broken refcounts ------------------------------------------------------------------------------
mk -o cluster_size=4k leak.qcow2 4M
io leak.qcow2 'write -P 0xd1 0 8k' 'write -P 0xd2 1M 4k' 'discard 4k 4k'
# The discard freed the host cluster of guest [4k,8k) (cluster 6; 7 holds guest 1M, so it is inside
# the file). Raise its refcount back to 1. (A leak past EOF would be invisible: qemu-img 7.2 check
# only compares refcounts of clusters below the end of the file.)
P set-refcount leak.qcow2 6 1
sample leak.qcow2 leaks "4 KiB clusters, 4 MiB; 0xd1 @ [0,4k), 0xd2 @ [1M,+4k); discard [4k,8k) freed host cluster 6, whose refcount is then patched 0 -> 1 (check: 1 leaked cluster, exit 3)"

mk -o cluster_size=4k corrupt-refcount.qcow2 4M
io corrupt-refcount.qcow2 'write -P 0xe1 0 8k' 'write -P 0xe2 1M 4k'
host=$(P host-cluster corrupt-refcount.qcow2 1M)
P set-refcount corrupt-refcount.qcow2 "$host" 0
sample corrupt-refcount.qcow2 broken "4 KiB clusters, 4 MiB; 0xe1 @ [0,8k), 0xe2 @ [1M,+4k); refcount of the data cluster for guest 1M patched 1 -> 0 (check: refcount=0 reference=1 + OFLAG_COPIED, exit 2)"

mk -o cluster_size=4k corrupt-l2.qcow2 4M
io corrupt-l2.qcow2 'write -P 0xe3 0 8k' 'write -P 0xe4 1M 4k'
# guest 1M now maps (COPIED) to host 1 MiB, far past EOF (the file is ~40 KiB)
P set-l2 corrupt-l2.qcow2 1048576 0x8000000000100000
sample corrupt-l2.qcow2 broken "4 KiB clusters, 4 MiB; 0xe3 @ [0,8k), 0xe4 @ [1M,+4k); the L2 entry for guest 1M patched to COPIED|0x100000 (host 1 MiB, past EOF); the old data cluster is leaked"

# --- header-level oddities -------------------------------------------------------------------------
mkdir -p loop
mk -o cluster_size=4k loop/a.qcow2 4M
mk -o cluster_size=4k -b a.qcow2 -F qcow2 loop/b.qcow2
qemu-img rebase -u -b b.qcow2 -F qcow2 loop/a.qcow2
sample loop/a.qcow2 broken,noopen "backing loop: a.qcow2 -> b.qcow2 -> a.qcow2 (made with rebase -u). qemu-img 7.2: info OK, info --backing-chain exit 1 'infinite loop', check/map HANG (unbounded memory) - never run them"
sample loop/b.qcow2 broken,noopen "backing loop partner of loop/a.qcow2"

mk -o cluster_size=4k truncated.qcow2 4M
io truncated.qcow2 'write -P 0x61 0 16k' 'write -P 0x62 1M 8k'
truncate -s 30000 truncated.qcow2
sample truncated.qcow2 broken "4 KiB clusters, 4 MiB; 0x61 @ [0,16k), 0x62 @ [1M,+8k), then the file is truncated to 30000 bytes (cuts cluster 7 in the middle; clusters 8-10 gone). Reads past EOF return zeros; check reports 3 corruptions (exit 2)"

mk -o cluster_size=4k unknown-incompat.qcow2 4M
io unknown-incompat.qcow2 'write -P 0x10 0 4k'
P or-u8 unknown-incompat.qcow2 79 0x80
sample unknown-incompat.qcow2 broken "4 KiB clusters, 4 MiB with 0x10 @ [0,4k); incompatible_features bit 7 set (byte 79 |= 0x80): QEMU refuses with 'Unknown incompatible feature: 80'"

mk -o cluster_size=4k corrupt-flag.qcow2 4M
io corrupt-flag.qcow2 'write -P 0x12 0 4k'
P or-u8 corrupt-flag.qcow2 79 0x02
sample corrupt-flag.qcow2 valid,corruptbit "4 KiB clusters, 4 MiB with 0x12 @ [0,4k); metadata fine but incompatible bit 1 (corrupt) set: read-only opens work, read-write opens fail"

qemu-img create -q -f qcow2 --object secret,id=sec0,data=qcowkit \
  -o cluster_size=4k,encrypt.format=aes,encrypt.key-secret=sec0 encrypted-aes.qcow2 4M
qemu-io --object secret,id=sec0,data=qcowkit \
  --image-opts driver=qcow2,file.filename=encrypted-aes.qcow2,encrypt.key-secret=sec0 \
  -c 'write -P 0x5e 0 8k' >/dev/null
sample encrypted-aes.qcow2 encrypted "4 KiB clusters, 4 MiB, legacy AES encryption (crypt_method=1, secret 'qcowkit'), 0x5e @ [0,8k) encrypted. info works (encrypted: true); map/check need the secret (exit 1)"

mk -o cluster_size=4k,data_file=datafile.data datafile.qcow2 128k
io datafile.qcow2 'write -P 0x77 0 8k' 'write -P 0x78 64k 4k' 'write -z 96k 4k'
sample datafile.qcow2 valid,datafile "external data file (incompatible bit 2): metadata in datafile.qcow2 (4 KiB clusters, 128 KiB), guest data in datafile.data (raw, 128 KiB, host offset == guest offset); 0x77 @ [0,8k), 0x78 @ [64k,+4k), write -z [96k,+4k)"
sample datafile.data raw "the external data file of datafile.qcow2"

# --- canonicalise, compute oracles, compress the big one ------------------------------------------
while IFS= read -r f; do
  cp --sparse=never "$f" "$f.tmp" && mv "$f.tmp" "$f"
done < <(find . -type f \( -name '*.qcow2' -o -name '*.raw' -o -name '*.data' \) | sort)

node "$HERE/oracle.mjs" "$SAMPLES"

gzip -n -9 c2m.qcow2

echo "images/: $(find . -type f | wc -l) files, $(du -sh --apparent-size . | cut -f1) apparent"
