{
  "targets": [
    {
      "target_name": "qcowkit_extents",
      "sources": ["native/extents.c"],
      "cflags": ["-O2"]
    }
  ]
}
