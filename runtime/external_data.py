"""What the runtime reads of an ONNX file's protobuf wire format: the files it keeps its tensors in (ONNX
"external data"), and its bytes less its metadata.

The runtime installs without the ``onnx`` package, so this walks the few messages that can hold a tensor:
a graph's initializers, and tensors and subgraphs in node attributes (If, Loop, Scan), at any depth.
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT, FIXED64, LENGTH_DELIMITED, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5  # groups: proto2's, deprecated

MODEL_GRAPH, MODEL_METADATA_PROPS = 7, 14
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
NODE_ATTRIBUTE = 5
ATTRIBUTE_TENSORS = {5, 10}  # t, tensors
ATTRIBUTE_GRAPHS = {6, 11}  # g, graphs
ATTRIBUTE_SPARSE_TENSORS = {22, 23}  # sparse_tensor, sparse_tensors
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION, EXTERNAL = 13, 14, 1
ENTRY_KEY, ENTRY_VALUE = 1, 2
MAX_GRAPH_DEPTH = 100  # subgraphs (or groups) in each other: protobuf's own limit on nesting, which onnxruntime keeps


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _value(message: memoryview, pos: int, wire_type: int) -> tuple[int, int]:
    """(offset of its contents, offset past it) of a value of ``wire_type`` (not a group) that starts at ``pos``:
    a length-delimited value's contents begin after its length."""
    if wire_type == VARINT:
        return pos, _varint(message, pos)[1]
    if wire_type in (FIXED64, FIXED32):
        return pos, pos + (8 if wire_type == FIXED64 else 4)
    if wire_type == LENGTH_DELIMITED:
        size, contents = _varint(message, pos)
        return contents, contents + size
    raise ValueError(f"unsupported wire type {wire_type}")


def _group_end(message: memoryview, pos: int, number: int) -> int:
    """The offset past the end-group key of group ``number`` whose fields start at ``pos`` (groups nest): an
    unknown field a newer or another writer may leave, which protobuf, and so onnxruntime, skips."""
    open_groups = [number]
    while open_groups:
        key, pos = _varint(message, pos)
        inner, wire_type = key >> 3, key & 7
        if wire_type == START_GROUP:
            if len(open_groups) >= MAX_GRAPH_DEPTH:
                raise ValueError(f"groups nested more than {MAX_GRAPH_DEPTH} deep")
            open_groups.append(inner)
        elif wire_type == END_GROUP:
            if open_groups.pop() != inner:
                raise ValueError("a group ends with another group's number")
        else:
            pos = _value(message, pos, wire_type)[1]
            if pos > len(message):
                raise ValueError("truncated field")
    return pos


def _spans(message: memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, offset of its key, of its value, of its end) of each field of ``message``."""
    pos = 0
    while pos < len(message):
        start = pos
        key, value = _varint(message, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == START_GROUP:
            pos = _group_end(message, value, number)
        elif wire_type == END_GROUP:
            raise ValueError("a group ends that never started")
        else:
            value, pos = _value(message, value, wire_type)
        if pos > len(message):
            raise ValueError("truncated field")
        yield number, wire_type, start, value, pos


def _fields(message: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(field number, contents) of each length-delimited field of ``message`` (views, not copies: tensors can be
    large); fields of other wire types are skipped."""
    for number, wire_type, _, value, end in _spans(message):
        if wire_type == LENGTH_DELIMITED:
            yield number, message[value:end]


def _tensor_locations(tensor: memoryview) -> Iterator[str]:
    """The location of a tensor kept in an external file; nothing for one whose data is in the model, whatever
    external data entries it carries (onnxruntime reads none for it)."""
    kept_outside = any(
        number == TENSOR_DATA_LOCATION and wire_type == VARINT and _varint(tensor, value)[0] == EXTERNAL
        for number, wire_type, _, value, _ in _spans(tensor)
    )
    if not kept_outside:
        return
    for number, entry in _fields(tensor):
        if number == TENSOR_EXTERNAL_DATA:
            parts = dict(_fields(entry))
            if ENTRY_KEY in parts and parts[ENTRY_KEY] == b"location" and ENTRY_VALUE in parts:
                yield bytes(parts[ENTRY_VALUE]).decode("utf-8")


def _sparse_locations(sparse: memoryview) -> Iterator[str]:
    for number, tensor in _fields(sparse):
        if number in (SPARSE_VALUES, SPARSE_INDICES):
            yield from _tensor_locations(tensor)


def _graph_locations(graph: memoryview, depth: int = 0) -> Iterator[str]:
    if depth > MAX_GRAPH_DEPTH:  # refused before Python's own limit on recursion is reached
        raise ValueError(f"subgraphs nested more than {MAX_GRAPH_DEPTH} deep")
    for number, field in _fields(graph):
        if number == GRAPH_INITIALIZER:
            yield from _tensor_locations(field)
        elif number == GRAPH_SPARSE_INITIALIZER:
            yield from _sparse_locations(field)
        elif number == GRAPH_NODE:
            for attribute_number, attribute in _fields(field):
                if attribute_number == NODE_ATTRIBUTE:
                    yield from _attribute_locations(attribute, depth)


def _attribute_locations(attribute: memoryview, depth: int) -> Iterator[str]:
    for number, field in _fields(attribute):
        if number in ATTRIBUTE_TENSORS:
            yield from _tensor_locations(field)
        elif number in ATTRIBUTE_GRAPHS:
            yield from _graph_locations(field, depth + 1)
        elif number in ATTRIBUTE_SPARSE_TENSORS:
            yield from _sparse_locations(field)


def external_data_files(model: bytes) -> list[str]:
    """The external data locations (paths relative to the model's folder) that ``model`` names, sorted, once
    each; ``[]`` for a self-contained model. ``ValueError`` if the bytes are not a well-formed protobuf."""
    graphs = (graph for number, graph in _fields(memoryview(model)) if number == MODEL_GRAPH)
    return sorted({location for graph in graphs for location in _graph_locations(graph)})


def without_metadata(model: bytes) -> Iterator[memoryview]:
    """``model``'s bytes, in pieces, less its ``metadata_props``: the same for two files of one model whose
    metadata differ (one written with ``export --quality``, one without). ``ValueError`` if the bytes are not a
    well-formed protobuf."""
    view = memoryview(model)
    kept = [(start, end) for number, _, start, _, end in _spans(view) if number != MODEL_METADATA_PROPS]
    return (view[start:end] for start, end in kept)
