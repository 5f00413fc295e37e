// Host-file allocation probing (SEEK_DATA / SEEK_HOLE) for `map`, which must report holes in
// allocated clusters exactly as qemu-img does, the OFD lock test (F_OFD_GETLK) QEMU uses to
// find conflicting image locks, and transparent huge pages for the copy's buffers (madvise).
// Node has neither lseek, fcntl nor madvise; no maintained package exposes SEEK_DATA/SEEK_HOLE,
// F_OFD_GETLK or MADV_HUGEPAGE, so this is the one piece of native code qcowkit builds.
#define _GNU_SOURCE
#include <node_api.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

// dataExtents(fd, start, end, max) -> Float64Array [dataStart0, dataEnd0, dataStart1, ...]
// covering [start, end); an empty array means all hole; null means the filesystem can't tell.
static napi_value data_extents(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd = -1;
  double startd = 0, endd = 0, maxd = 0;
  napi_get_value_int32(env, argv[0], &fd);
  napi_get_value_double(env, argv[1], &startd);
  napi_get_value_double(env, argv[2], &endd);
  napi_get_value_double(env, argv[3], &maxd);
  off_t pos = (off_t)startd, end = (off_t)endd;
  size_t max = (size_t)maxd, n = 0;
  if (max > 65536) max = 65536;
  static double out[2 * 65536];
  while (pos < end && n < max) {
    off_t data = lseek(fd, pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break; // hole to EOF
      napi_value nul;
      napi_get_null(env, &nul);
      return nul;
    }
    if (data >= end) break;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) hole = end;
    if (hole > end) hole = end;
    out[2 * n] = (double)data;
    out[2 * n + 1] = (double)hole;
    n++;
    pos = hole;
  }
  napi_value ab, arr;
  void *buf;
  napi_create_arraybuffer(env, n * 2 * sizeof(double), &buf, &ab);
  for (size_t i = 0; i < 2 * n; i++) ((double *)buf)[i] = out[i];
  napi_create_typedarray(env, napi_float64_array, 2 * n, ab, 0, &arr);
  return arr;
}

// dataExtentsMany(fd, ranges: Float64Array [s0, e0, s1, e1, ...]) -> Float64Array laid out per
// range, in input order: count c, then c pairs [dataStart, dataEnd) clipped to the range; null
// when the filesystem can't tell. One call for a whole batch: `map` probes every allocated
// cluster of metadata-preallocated images, often hundreds of thousands of them. Ranges are
// probed in host order and each lseek answer is reused while it is still valid ("no data
// between q and d", "data between d and h"), which saves the SEEK_DATA that would find the next
// range's data again: about two syscalls per range instead of three.
typedef struct {
  double start, end;
  size_t index;
} range_t;

static int by_start(const void *a, const void *b) {
  const range_t *x = a, *y = b;
  return x->start < y->start ? -1 : x->start > y->start ? 1 : 0;
}

static napi_value data_extents_many(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], result;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd = -1;
  napi_get_value_int32(env, argv[0], &fd);
  napi_typedarray_type type;
  size_t len = 0;
  void *data = NULL;
  if (napi_get_typedarray_info(env, argv[1], &type, &len, &data, NULL, NULL) != napi_ok || type != napi_float64_array) {
    napi_throw_type_error(env, NULL, "dataExtentsMany: ranges must be a Float64Array");
    return NULL;
  }
  const double *in = data;
  size_t n = len / 2;
  range_t *order = malloc((n ? n : 1) * sizeof(range_t));
  size_t *count = calloc(n ? n : 1, sizeof(size_t));
  size_t cap = 4 * n + 16, used = 0;
  double *pairs = malloc(cap * sizeof(double)); // all ranges' pairs, in host order
  size_t *first = malloc((n ? n : 1) * sizeof(size_t));
  int failed = !order || !count || !pairs || !first;
  for (size_t i = 0; !failed && i < n; i++) {
    order[i].start = in[2 * i];
    order[i].end = in[2 * i + 1];
    order[i].index = i;
  }
  if (!failed) qsort(order, n, sizeof(range_t), by_start);
  // Memo: no data in [dq, dAns) and data starts at dAns (dAns = -1: none up to EOF);
  // data in [hq, hAns) (hAns = hole start).
  off_t dq = -1, dAns = -2, hq = -1, hAns = -1;
  for (size_t r = 0; !failed && r < n; r++) {
    off_t pos = (off_t)order[r].start, end = (off_t)order[r].end;
    size_t idx = order[r].index;
    first[idx] = used;
    while (pos < end) {
      off_t d;
      if (hq >= 0 && pos >= hq && pos < hAns) d = pos;
      else if (dq >= 0 && pos >= dq && (dAns == -1 || pos <= dAns)) d = dAns;
      else {
        d = lseek(fd, pos, SEEK_DATA);
        if (d < 0) {
          if (errno != ENXIO) {
            failed = 1;
            break;
          }
          d = -1; // hole to EOF
        }
        dq = pos;
        dAns = d;
      }
      if (d < 0 || d >= end) break;
      off_t h;
      if (hq >= 0 && d >= hq && d < hAns) h = hAns;
      else {
        h = lseek(fd, d, SEEK_HOLE);
        if (h < 0) h = end;
        hq = d;
        hAns = h;
      }
      if (used + 2 > cap) {
        cap *= 2;
        double *grown = realloc(pairs, cap * sizeof(double));
        if (!grown) {
          failed = 1;
          break;
        }
        pairs = grown;
      }
      pairs[used++] = (double)d;
      pairs[used++] = (double)(h > end ? end : h);
      count[idx]++;
      pos = h;
    }
  }
  if (failed) {
    napi_get_null(env, &result);
  } else {
    napi_value ab;
    void *buf;
    napi_create_arraybuffer(env, (n + used) * sizeof(double), &buf, &ab);
    double *o = buf;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
      o[at++] = (double)count[i];
      for (size_t j = 0; j < 2 * count[i]; j++) o[at++] = pairs[first[i] + j];
    }
    napi_create_typedarray(env, napi_float64_array, n + used, ab, 0, &result);
  }
  free(order);
  free(count);
  free(pairs);
  free(first);
  return result;
}

// ofdLocked(fd, byte) -> true when another open file description holds a lock on that byte,
// false when none does, null when the test itself fails (no F_OFD_GETLK: the caller falls back).
// A write-lock test conflicts with any lock, shared or not, and needs no writable descriptor.
static napi_value ofd_locked(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], result;
  int32_t fd;
  int64_t byte;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int64(env, argv[1], &byte) != napi_ok) {
    napi_throw_type_error(env, NULL, "ofdLocked(fd, byte)");
    return NULL;
  }
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (fcntl(fd, F_OFD_GETLK, &fl) != 0) {
    napi_get_null(env, &result);
    return result;
  }
  napi_get_boolean(env, fl.l_type != F_UNLCK, &result);
  return result;
}

// adviseHugePages(buffer: ArrayBuffer, offset, length) -> true when the kernel was asked to back
// the 2 MiB-aligned part of [offset, offset+length) of the buffer with transparent huge pages
// (MADV_HUGEPAGE; pages already touched stay as they are). A direct write from 4 KiB pages goes
// out as requests of ~1 MiB (a request holds a bounded number of memory segments), from huge
// pages as requests of the device's maximum size, which virtual disks take much faster.
static napi_value advise_huge_pages(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], result;
  void *data;
  size_t size;
  double offd, lend;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 3 || napi_get_arraybuffer_info(env, argv[0], &data, &size) != napi_ok || napi_get_value_double(env, argv[1], &offd) != napi_ok ||
      napi_get_value_double(env, argv[2], &lend) != napi_ok || offd < 0 || lend < 0 || offd + lend > (double)size) {
    napi_throw_type_error(env, NULL, "adviseHugePages(buffer, offset, length) within the buffer");
    return NULL;
  }
  const uintptr_t huge = (uintptr_t)2 << 20;
  uintptr_t from = ((uintptr_t)data + (uintptr_t)offd + huge - 1) & ~(huge - 1);
  uintptr_t to = ((uintptr_t)data + (uintptr_t)offd + (uintptr_t)lend) & ~(huge - 1);
  int ok = 0;
#ifdef MADV_HUGEPAGE
  ok = to > from && madvise((void *)from, to - from, MADV_HUGEPAGE) == 0;
#endif
  napi_get_boolean(env, ok, &result);
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "dataExtents", NAPI_AUTO_LENGTH, data_extents, NULL, &fn);
  napi_set_named_property(env, exports, "dataExtents", fn);
  napi_create_function(env, "dataExtentsMany", NAPI_AUTO_LENGTH, data_extents_many, NULL, &fn);
  napi_set_named_property(env, exports, "dataExtentsMany", fn);
  napi_create_function(env, "ofdLocked", NAPI_AUTO_LENGTH, ofd_locked, NULL, &fn);
  napi_set_named_property(env, exports, "ofdLocked", fn);
  napi_create_function(env, "adviseHugePages", NAPI_AUTO_LENGTH, advise_huge_pages, NULL, &fn);
  napi_set_named_property(env, exports, "adviseHugePages", fn);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
