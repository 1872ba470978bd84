"""`python tests/gcs_emulator_server.py PORT BUCKET`: gcp-storage-emulator (in memory, on 127.0.0.1) with the two
parts of the GCS JSON API that tensorstore's gcs driver needs and the emulator (2026.7.19) lacks:

1. the object's generation in the `x-goog-generation` header of a media download (GET ...?alt=media). tensorstore
   reads it as the value's StorageGeneration; without it every read of an existing object fails with
   "Malformed StorageGeneration" (Orbax's OCDBT manifest is read back while a checkpoint is written).
2. generation preconditions (`ifGenerationMatch` / `ifGenerationNotMatch`) on downloads, metadata GETs, uploads and
   deletes: 412 Precondition Failed, or 304 Not Modified for a download whose generation is unchanged, as GCS
   answers. tensorstore's conditional writes (the OCDBT manifest's read-modify-write) depend on them.

Everything else is the emulator's own code; the wrappers only check the documented preconditions and add the
documented header (https://cloud.google.com/storage/docs/json_api/v1/objects/get#parameters,
https://cloud.google.com/storage/docs/xml-api/reference-headers#xgooggeneration).
"""

from __future__ import annotations

import sys
import threading
from http import HTTPStatus


def _current_generation(storage, request) -> str:
  """The object's live generation, "0" when it does not exist (GCS's convention for ifGenerationMatch=0)."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  bucket = request.params["bucket_name"]
  name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
  if name is None:
    return "0"
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return "0"


def _precondition(request, storage, *, reading: bool):
  """None when the request's generation preconditions hold, else the status GCS answers with."""
  match = request.query.get("ifGenerationMatch")
  not_match = request.query.get("ifGenerationNotMatch")
  if not match and not not_match:
    return None
  current = _current_generation(storage, request)
  if match and match[0] != current:
    return HTTPStatus.PRECONDITION_FAILED
  if not_match and not_match[0] == current:
    return HTTPStatus.NOT_MODIFIED if reading else HTTPStatus.PRECONDITION_FAILED
  return None


_LOCK = threading.Lock()  # a precondition check and the write it guards are one step (the server is one thread)


def _guarded(handler, *, reading: bool, add_generation: bool):
  def wrapped(request, response, storage, *args, **kwargs):
    with _LOCK:
      status = _precondition(request, storage, reading=reading)
      if status is not None:
        response.status = status
        return None
      out = handler(request, response, storage, *args, **kwargs)
      if add_generation and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        generation = _current_generation(storage, request)
        if generation != "0":
          response["x-goog-generation"] = generation
          response["x-goog-metageneration"] = "1"
      return out
  return wrapped


def patch() -> None:
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  wrappers = {
      objects.download: _guarded(objects.download, reading=True, add_generation=True),
      objects.get: _guarded(objects.get, reading=True, add_generation=True),
      objects.insert: _guarded(objects.insert, reading=False, add_generation=False),
      objects.delete: _guarded(objects.delete, reading=False, add_generation=False),
  }
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler in wrappers:
        methods[method] = wrappers[handler]


def main(argv: list[str]) -> None:
  port, bucket = int(argv[1]), argv[2]
  import logging  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.CRITICAL)
  patch()
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  main(sys.argv)
