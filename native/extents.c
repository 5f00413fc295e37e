// Host-file allocation probing (SEEK_DATA / SEEK_HOLE) for `map`, which must report holes in
// allocated clusters exactly as qemu-img does. Node has no lseek; no maintained package exposes
// SEEK_DATA/SEEK_HOLE, so this is the one piece of native code qcowkit builds itself.
#define _GNU_SOURCE
#include <node_api.h>
#include <errno.h>
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

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "dataExtents", NAPI_AUTO_LENGTH, data_extents, NULL, &fn);
  napi_set_named_property(env, exports, "dataExtents", fn);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
