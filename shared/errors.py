"""Every error code the service answers with, declared once.

Domain code on both sides (the worker's image stages, the API's parsers and stores) raises or
returns an error with a code, a message and, where it applies, the field it is about. Only the API
turns a code into an HTTP status and an OpenAI error type (``api.errors.ERRORS``), so a per-item
error crosses the queue as code and message alone.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # The request's form
    INVALID_REQUEST = "invalid_request"  # a field is missing, of the wrong type or out of range
    INVALID_JSON = "invalid_json"  # the body (or a batch line) is not JSON
    TOO_MANY_JSON_VALUES = "too_many_json_values"  # the body holds more JSON values than any valid request needs
    TOO_MANY_INPUTS = "too_many_inputs"  # more images than IMBEDDINGS_MAX_INPUTS in one request
    INVALID_DIMENSIONS = "invalid_dimensions"  # dimensions larger than the model's vectors
    REQUEST_EXCEEDS_TIMEOUT = "request_exceeds_timeout"  # the images need more model time than the request timeout
    EXCEEDS_KEY_QUOTA = "exceeds_key_quota"  # one request holds more images than the key may have queued at all
    INVALID_PURPOSE = "invalid_purpose"  # a file upload with a purpose other than batch
    INVALID_ENDPOINT = "invalid_endpoint"  # a batch for an endpoint other than /v1/embeddings
    INVALID_COMPLETION_WINDOW = "invalid_completion_window"  # a batch with a completion window other than 24h
    INVALID_FILE = "invalid_file"  # a batch input file that is not UTF-8 JSONL requests within the limits
    DUPLICATE_CUSTOM_ID = "duplicate_custom_id"  # a batch line reusing an earlier line's custom_id
    BATCH_CANCELLED = "batch_cancelled"  # a batch line whose job the batch's cancel stopped

    # One input image, found bad by the API's parser or the worker
    INVALID_IMAGE = "invalid_image"  # not an image, corrupt, truncated or without pixels
    INVALID_BASE64 = "invalid_base64"  # not a URL, data URI or valid base64
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a data URI whose media type is not an image
    UNSUPPORTED_IMAGE = "unsupported_image"  # an image format variant that is refused (RLE-compressed BMP)
    IMAGE_TOO_LARGE = "image_too_large"  # over the byte, side, pixel or decode-memory limit
    TOO_MANY_SEGMENTS = "too_many_segments"  # more marker segments / chunks / TIFF entries than allowed
    TOO_MANY_SCANS = "too_many_scans"  # a progressive JPEG with more scans than allowed
    METADATA_TOO_LARGE = "metadata_too_large"  # more metadata bytes than allowed
    DECODE_BUDGET_EXCEEDED = "decode_budget_exceeded"  # decoding took more CPU seconds than allowed
    DECODER_UNAVAILABLE = "decoder_unavailable"  # the decoder process did not start
    INVALID_URL = "invalid_url"  # a URL that is malformed, not http(s), or whose host cannot be a host
    URL_FETCH_FAILED = "url_fetch_failed"  # the URL could not be fetched (DNS, connection, TLS, a cut body)
    URL_FETCH_TIMEOUT = "url_fetch_timeout"  # the fetch took longer than its timeout
    URL_HTTP_ERROR = "url_http_error"  # the URL answered with an HTTP error status
    URL_TOO_MANY_REDIRECTS = "url_too_many_redirects"  # more redirects than allowed
    URL_FORBIDDEN_ADDRESS = "url_forbidden_address"  # the host resolves only to private, loopback or reserved addresses
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the request's deadline passed while the image was worked on
    REQUEST_WITHDRAWN = "request_withdrawn"  # the client left, the deadline passed or the job was cancelled
    WORKER_STOPPING = "worker_stopping"  # the worker stopped before it reached the image

    # The service's side of one image, or of the work as a whole
    INPUT_EXPIRED = "input_expired"  # the image's stored bytes expired before a worker reached them
    INFERENCE_FAILED = "inference_failed"  # the model raised on the image's batch
    WORKER_ERROR = "worker_error"  # the worker failed on the whole request
    CHUNK_FAILED = "chunk_failed"  # a job chunk failed on every delivery
    INTERNAL_ERROR = "internal_error"  # an unexpected error in the API (it is logged)

    # Authentication
    MISSING_API_KEY = "missing_api_key"  # no Authorization: Bearer header
    INVALID_API_KEY = "invalid_api_key"  # a key that is not configured

    # Things that are not there
    NOT_FOUND = "not_found"  # no such route
    MODEL_NOT_FOUND = "model_not_found"  # a model this deployment does not offer
    JOB_NOT_FOUND = "job_not_found"  # no such job for this key
    JOB_EXPIRED = "job_expired"  # the job's TTL has passed
    JOB_RESULTS_DELETED = "job_results_deleted"  # the job was cancelled or deleted
    FILE_NOT_FOUND = "file_not_found"  # no such file for this key
    BATCH_NOT_FOUND = "batch_not_found"  # no such batch for this key
    METHOD_NOT_ALLOWED = "method_not_allowed"  # the route exists, not with this method

    # The HTTP exchange
    HEADER_TIMEOUT = "header_timeout"  # the request head did not arrive in time
    BODY_TIMEOUT = "body_timeout"  # the request body did not arrive in time
    HEADERS_TOO_LARGE = "headers_too_large"  # the request head is over its byte limit
    REQUEST_TOO_LARGE = "request_too_large"  # the request body is over its byte limit
    CLIENT_CLOSED_REQUEST = "client_closed_request"  # the client closed the connection before the answer

    # Load: retry later
    QUEUE_FULL = "queue_full"  # the model's queue is at its depth or wait limit
    KEY_QUOTA_EXCEEDED = "key_quota_exceeded"  # the key's queued images leave no room for these
    TOO_MANY_BYTES_IN_FLIGHT = "too_many_bytes_in_flight"  # the API holds its budget of request bodies
    MODEL_NOT_SERVED = "model_not_served"  # no worker serves the model right now
    QUEUE_UNAVAILABLE = "queue_unavailable"  # Redis is unreachable
    TIMEOUT = "timeout"  # no worker answered within the request timeout
    REDIS_FULL = "redis_full"  # Redis has no room for the work


def oversized_dimensions(dimensions: int, dim: int) -> str:
    """The message of ``INVALID_DIMENSIONS``, the same whichever side finds it (API at submit or read, worker before a job)."""
    return f"dimensions={dimensions} is larger than the model's embedding size {dim}"
