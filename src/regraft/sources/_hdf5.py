"""A reader of the HDF5 metadata that h5py writes by default, for opening Keras weight files fast.

The HDF5 C library spends about 50 µs opening one dataset, so a ``.weights.h5`` file of
10,000 variables took over a second to list through h5py. This module decodes, from a
bytes view of the image (an mmap), exactly the subset of the HDF5 File Format
Specification (version 2/3 of the document) that h5py writes with its default
``libver='earliest'``:

* superblock version 0, 8-byte offsets and lengths, base address 0, end-of-file
  address equal to the image's size;
* groups as symbol tables: a version-1 B-tree of group nodes over symbol table nodes
  (``SNOD``), names in a local heap (``HEAP``);
* version-1 object headers and their continuation blocks, holding the messages
  dataspace, datatype, fill value (old and new), data layout (version 3 or 4,
  contiguous or compact), symbol table and attribute (versions 1-3);
* datatypes: fixed-point (1, 2, 4, 8 bytes), IEEE floating point (2, 4, 8 bytes),
  opaque (Keras' bfloat16), and, for attributes only, fixed-length and
  variable-length strings, the latter read from global heap collections (``GCOL``).

Anything else (a filter pipeline, chunked or virtual storage, external files, a
soft or external link, dense or new-style groups, shared messages, a version this
reader does not know, an address outside the image, an object reached twice, a
count that does not add up) raises :class:`NotHandled`. The caller then opens the
file with h5py instead, which keeps all of its checks and its exact errors: this
reader never decides that a file is bad, it only declines it. Every offset read is
bounds-checked by ``struct.unpack_from`` (a ``struct.error`` becomes
:class:`NotHandled`) or explicitly; every loop is bounded by the image's size or a
visited set, so damaged bytes cannot make it loop or allocate more than the image.
"""

from __future__ import annotations

import functools
import operator
import struct
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import numpy as np

__all__ = ["NotHandled", "Group", "Dataset", "DataType", "Attribute", "read_tree", "attribute_value", "attribute_list"]

SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SUPERBLOCK_0 = bytes([0, 0, 0, 0, 0, 8, 8, 0])
_UCHAR = bytes.fromhex("100000000100000000000800")  # the base type of a variable-length string: 1-byte unsigned
_UNDEFINED = 0xFFFF_FFFF_FFFF_FFFF
_SUPERBLOCK_END = 96  # a version-0 superblock with 8-byte offsets and its root group entry
_MAX_DEPTH = 64  # group nesting; Keras nests a dozen levels at most

# Object header message types (specification IV.A.2).
_NIL, _DATASPACE, _DATATYPE, _FILL_OLD, _FILL, _LAYOUT = 0x0, 0x1, 0x3, 0x4, 0x5, 0x8
_ATTRIBUTE, _CONTINUATION, _SYMBOL_TABLE = 0xC, 0x10, 0x11
_IGNORED = frozenset({_NIL, _FILL_OLD})  # a modification time is declined: HDF5 checks its format when listing
_DATASET = _IGNORED | {_DATASPACE, _DATATYPE, _FILL, _LAYOUT, _ATTRIBUTE, _CONTINUATION}  # messages a plain dataset may hold
_GROUP = _IGNORED | {_SYMBOL_TABLE, _ATTRIBUTE, _CONTINUATION}

_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_u64 = struct.Struct("<Q").unpack_from
_header_v1 = struct.Struct("<BBHII").unpack_from  # version, reserved, messages, references, chunk size
_message_v1 = struct.Struct("<HHB3x").unpack_from  # type, size, flags
_tree = struct.Struct("<4sBBHQQ").unpack_from  # signature, node type, level, entries, left, right
_entry = struct.Struct("<QQI4xQQ").unpack_from  # name offset, header address, cache type, scratch
_block = struct.Struct("<QQ").unpack_from  # address and length (a continuation block, a symbol table)
_layout = struct.Struct("<BBQQ").unpack_from  # version, class, address, size (contiguous)
_attribute_head = struct.Struct("<BBHHH").unpack_from  # version, flags, name, datatype and dataspace sizes
_snod = struct.Struct("<4sBxH").unpack_from  # signature, version, number of symbols
_heap = struct.Struct("<4sB3xQQQ").unpack_from  # signature, version, data size, free list, data address


class NotHandled(Exception):
    """The image uses HDF5 beyond this reader's subset, or is inconsistent: open it with h5py."""


class Attribute:
    """An attribute's encoded type, shape and value bytes; decoded on demand by :func:`attribute_value`."""

    __slots__ = ("datatype", "shape", "data")

    def __init__(self, datatype: bytes, shape: tuple[int, ...] | None, data: bytes) -> None:
        self.datatype, self.shape, self.data = datatype, shape, data


class Group:
    """A group: its members by name and its attributes (encoded)."""

    __slots__ = ("path", "members", "attributes")

    def __init__(self, path: str, attributes: dict[str, Attribute]) -> None:
        self.path, self.attributes = path, attributes
        self.members: dict[str, Group | Dataset] = {}


class DataType(NamedTuple):
    """A dataset's type, described without numpy (listing a file needs none).

    Attributes:
        code: the numpy type string h5py gives the dataset (file byte order; ``V<n>`` for opaque),
            e.g. ``"<f4"``, ``">i8"``, ``"V2"``.
        kind: numpy's kind character: ``"i"``, ``"u"``, ``"f"`` or ``"V"``.
        itemsize: bytes per value.
        name: numpy's name of that dtype (``"float32"``, ``"void16"``).
    """

    code: str
    kind: str
    itemsize: int
    name: str


_DTYPES: dict[str, np.dtype] = {}  # DataType.code -> numpy dtype, made when a tensor is read


class Dataset:
    """A dataset of numbers: shape, type (a :class:`DataType`) and where its bytes are.

    ``offset`` is where a contiguous dataset's ``size`` bytes start in the image;
    a compact dataset has ``offset`` ``None`` and its bytes in ``compact``. The numpy
    dtype (:attr:`dtype`) is made only when asked, so that listing imports no numpy.
    """

    __slots__ = ("path", "shape", "type", "offset", "size", "compact", "attributes")

    def __init__(self, path: str, shape: tuple[int, ...], datatype: DataType, offset: int | None, size: int,
                 compact: bytes | None, attributes: dict[str, Attribute]) -> None:
        self.path, self.shape, self.type, self.offset, self.size = path, shape, datatype, offset, size
        self.compact, self.attributes = compact, attributes

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype h5py gives this dataset (imports numpy)."""
        code = self.type.code
        dtype = _DTYPES.get(code)
        if dtype is None:
            import numpy as np

            dtype = _DTYPES[code] = np.dtype(code)
        return dtype


def read_tree(image: Any) -> tuple[Group, dict[str, Group | Dataset]]:
    """The root group of an HDF5 image and every object in it by path (``layers/dense/vars/0``).

    ``image`` is a bytes-like object holding exactly the image (a memoryview of a map of the
    file, or of a window of it), so that any read past its end fails.

    Raises :class:`NotHandled` for anything outside the subset described above.
    """
    try:
        return _Reader(image).tree()
    except (struct.error, IndexError, ValueError, TypeError, OverflowError, UnicodeDecodeError, RecursionError) as exc:
        raise NotHandled(f"{type(exc).__name__}: {exc}") from None


def attribute_value(image: Any, attribute: Attribute, heaps: dict[int, dict[int, tuple[int, int]]]) -> object:
    """An attribute's value as h5py gives it, for the types Keras writes there.

    A scalar variable-length string is a ``str``, a scalar fixed-length one ``bytes``;
    an array of strings is a numpy array (``S<n>`` or ``object`` of ``str``); an
    empty numeric array (tf-keras' empty ``weight_names``) is an empty float array.
    Other types or values raise :class:`NotHandled`. ``heaps`` keeps the global heap
    collections walked so far (pass the same dict for every attribute of one image).
    """
    try:
        return _decode_attribute(image, attribute, heaps)
    except (struct.error, IndexError, ValueError, TypeError, OverflowError, UnicodeDecodeError) as exc:
        raise NotHandled(f"{type(exc).__name__}: {exc}") from None


def attribute_list(image: Any, attribute: Attribute, heaps: dict[int, dict[int, tuple[int, int]]]) -> list | None:
    """A one-dimensional attribute's items as ``attribute_value(...).tolist()`` gives them, without numpy.

    For the lists tf-keras writes (``layer_names``, ``weight_names``): strings, or an
    empty numeric array (``[]``). ``None`` for any other shape (ask :func:`attribute_value`);
    a type or value :func:`attribute_value` declines raises :class:`NotHandled` alike.
    """
    try:
        return _attribute_list(image, attribute, heaps)
    except (struct.error, IndexError, ValueError, TypeError, OverflowError, UnicodeDecodeError) as exc:
        raise NotHandled(f"{type(exc).__name__}: {exc}") from None


# ------------------------------------------------------------------------------------------------ reader


class _Reader:
    def __init__(self, image: Any) -> None:
        self.image = image
        self.size = len(image)
        self.seen: set[int] = set()  # object headers, B-tree and symbol table nodes, continuation blocks
        self.heaps: dict[int, bytes] = {}  # local heap address -> its data segment
        self.types: dict[bytes, DataType] = {}  # encoded datatype -> its description
        self.objects: dict[str, Group | Dataset] = {}  # every path -> its object
        self.templates: dict[tuple, list[_Template]] = {}  # header prefix -> layouts of headers read before
        self.attribute_heads: dict[bytes, tuple] = {}  # an attribute message up to its value -> what it says

    def tree(self) -> tuple[Group, dict[str, Group | Dataset]]:
        image = self.image
        if self.size < 96 or image[:8] != SIGNATURE:
            raise NotHandled("no superblock at byte 0")
        if image[8:16] != _SUPERBLOCK_0:  # versions 0 (superblock, free space, root entry, shared headers), 8-byte sizes
            raise NotHandled(f"superblock version {image[8]} or offsets and lengths other than 8 bytes")
        self.leaf_k, self.node_k, flags = struct.unpack_from("<HHI", image, 16)
        if flags:
            raise NotHandled("file consistency flags set")
        base, extension, end, driver = struct.unpack_from("<QQQQ", image, 24)
        if base or extension != _UNDEFINED or end != self.size or driver != _UNDEFINED or not self.leaf_k or not self.node_k:
            raise NotHandled("base address, extension, end of file or driver block outside the subset")
        name, header, cache, btree, heap = _entry(image, 56)
        if name or cache not in (0, 1):
            raise NotHandled("root group entry")
        root = self.group("", header, cache, btree, heap)
        return root, self.objects

    def claim(self, address: int, what: str) -> None:
        if address in self.seen:
            raise NotHandled(f"{what} at byte {address} reached twice")
        self.seen.add(address)

    # -------------------------------------------------------------------------------------- groups

    def group(self, path: str, header: int, cache: int, btree: int, heap: int, depth: int = 0,
              messages: dict[int, list[tuple[int, int]]] | None = None, found: tuple | None = None) -> Group:
        """The group whose header is at ``header`` (already read as ``messages`` or ``found``, or not yet)."""
        if depth > _MAX_DEPTH:
            raise NotHandled("groups nested too deep")
        if found is None and messages is None:
            found = self.quick(header)
        if found is not None and found[0].kind == _SYMBOL_TABLE:
            template, values = found
            tree_address, heap_address = values[template.fields[0]], values[template.fields[1]]
            attributes = template.attributes_of(values)
        else:
            if messages is None:
                messages = self.messages(header)
            table = messages.get(_SYMBOL_TABLE)
            if table is None or len(table) != 1 or table[0][1] < 16 or not _GROUP.issuperset(messages):
                raise NotHandled(f"group '/{path}' is not a plain symbol-table group")
            tree_address, heap_address = _block(self.image, table[0][0])
            attributes = self.attributes(messages) if _ATTRIBUTE in messages else {}
            self.learn(header, messages)
        if cache == 1 and (btree, heap) != (tree_address, heap_address):
            raise NotHandled(f"group '/{path}': cached symbol table differs from its header's")
        group = Group(path, attributes)
        prefix = path + "/" if path else ""
        members, objects = group.members, self.objects
        for name, (child, child_cache, child_btree, child_heap) in self.symbols(tree_address, self.local_heap(heap_address)):
            child_path = prefix + name
            if child_cache == 1:
                member = self.group(child_path, child, 1, child_btree, child_heap, depth + 1)
            else:
                member = self.object(child_path, child, depth + 1)
            members[name] = objects[child_path] = member
        return group

    def object(self, path: str, header: int, depth: int) -> Group | Dataset:
        """An object named by a symbol table entry without a cached group: a dataset, or a group after all."""
        found = self.quick(header)
        if found is not None:
            template, values = found
            if template.kind == _SYMBOL_TABLE:
                return self.group(path, header, 0, 0, 0, depth, found=found)
            return self.quick_dataset(path, template, values)
        messages = self.messages(header)
        if _SYMBOL_TABLE in messages:
            return self.group(path, header, 0, 0, 0, depth, messages)
        dataset = self.dataset(path, messages)
        if dataset.offset is not None:
            self.learn(header, messages)
        return dataset

    # ------------------------------------------------------------------------ headers seen before

    def quick(self, header: int) -> tuple[_Template, tuple] | None:
        """The header's fields, when it is laid out like a header read before (same prefix, same
        message types, sizes and flags at the same places, same constant fields); else ``None``."""
        image, seen = self.image, self.seen
        templates = self.templates.get(_header_v1(image, header))
        if templates:
            for template in templates:
                try:
                    values = template.unpack(image, header + 16)
                except struct.error:
                    return None
                if template.constants(values) != template.expected:
                    continue
                block = template.block
                if block is not None:  # the rest of the header is in a continuation block laid out like before
                    address = values[template.link]
                    try:
                        values = block.unpack(image, address)
                    except struct.error:
                        return None
                    if block.constants(values) != block.expected:
                        continue
                    if address in seen:
                        raise NotHandled(f"continuation block at byte {address} reached twice")
                    seen.add(address)
                    template = block
                if header in seen:
                    raise NotHandled(f"object header at byte {header} reached twice")
                seen.add(header)
                return template, values
        return None

    def learn(self, header: int, messages: dict[int, list[tuple[int, int]]]) -> None:
        """Keep the layout of a header just read whole, for :meth:`quick`: a plain group or a contiguous dataset.

        Either every message is in the header's first block, or the first block holds a
        single continuation message and its block all the others. Every constant field
        (message headers, versions, flags, rank, fill value, an attribute up to its value,
        a continuation block's length) must then match exactly, so that a header read
        quickly passed the same checks.
        """
        image = self.image
        prefix = _header_v1(image, header)
        known = self.templates.setdefault(prefix, [])
        if len(known) >= 8:
            return
        items = sorted((start, kind, body) for kind, found in messages.items() for start, body in found)
        first, heads, group = header + 16, self.attribute_heads, _SYMBOL_TABLE in messages
        continuation = messages.get(_CONTINUATION)
        if continuation is None:
            layout = _Layout(image, first, items, prefix[4], heads)
            if layout.complete(group):
                known.append(layout.template())
            return
        start = continuation[0][0]
        if len(continuation) != 1 or start != first + 8 or prefix[4] != 24:
            return  # not a first block holding a single continuation message
        address, length = _block(image, start)
        rest = [item for item in items if item[0] != start]
        if any(not address < at < address + length for at, _, _ in rest):
            return
        link = _Layout(image, first, [(start, _CONTINUATION, 16)], prefix[4], heads)
        block = _Layout(image, address, rest, length, heads)
        if link.ok and block.complete(group):
            template = link.template()
            template.block, template.link = block.template(), link.fields["link"][0]
            known.append(template)

    def quick_dataset(self, path: str, template: _Template, values: tuple) -> Dataset:
        dims, maximum, kind, (offset, size) = template.fields
        shape = values[dims]
        if maximum is not None and values[maximum] != shape:
            raise NotHandled("dataspace with maximum dimensions")
        encoded = values[kind[0]]
        dtype = self.types.get(encoded)
        if dtype is None:
            dtype = self.types[encoded] = _numeric_type(encoded)
        offset, size = values[offset], values[size]
        declared = dtype.itemsize
        for d in shape:
            declared *= d
        if offset == _UNDEFINED or size != declared or offset > self.size or size > self.size - offset:
            raise NotHandled(f"'/{path}': contiguous storage not allocated or not the declared size")
        return Dataset(path, shape, dtype, offset, size, None, template.attributes_of(values))

    def local_heap(self, address: int) -> bytes:
        """A local heap's data segment, where a group's member names are."""
        known = self.heaps.get(address)
        if known is not None:
            return known
        signature, version, size, free, data = _heap(self.image, address)
        if signature != b"HEAP" or version != 0 or data > self.size or size > self.size - data:
            raise NotHandled(f"local heap at byte {address}")
        known = self.heaps[address] = bytes(self.image[data : data + size])
        blocks = set()
        while free != 1:  # the free list, checked as HDF5 checks it on loading the heap (1 ends it)
            if free in blocks or free + 16 > size:
                raise NotHandled(f"local heap at byte {address}: its free list")
            blocks.add(free)
            following, length = _block(known, free)
            if not length or length > size - free:
                raise NotHandled(f"local heap at byte {address}: its free list")
            free = following
        return known

    def symbols(self, address: int, heap: bytes) -> list[tuple[str, tuple[int, int, int, int]]]:
        """A group's entries in name order, from its B-tree.

        The keys must bracket the names as HDF5's lookup by name expects (each child's
        names after its left key and up to its right key), so that every name listed
        here is one h5py would also find.
        """
        image, out = self.image, []
        node_end = 24 + 8 * (4 * self.node_k + 1)  # HDF5 reads whole nodes: 2K children and 2K + 1 keys
        signature, kind, level, used, left, right = _tree(image, address)
        if signature == b"TREE" and not kind and not level and used == 1 and address not in self.seen \
                and left == right == _UNDEFINED and address + node_end <= self.size:
            # The common case, a group of up to 2K members: one leaf over one symbol table node.
            self.seen.add(address)
            low, child, high = _quads(3)(image, address + 24)
            low, high = _name(heap, low), _name(heap, high)
            names = self.symbol_node(child, heap, out)
            if names[0] <= low or names[-1] > high:
                raise NotHandled(f"symbol table node at byte {child}: names outside its B-tree keys")
            return [(name.decode("utf-8"), entry) for name, entry in out]
        pending = [(address, None, None, -1)]  # node, its parent's keys around it (None: no bound), expected level
        previous: dict[int, tuple[int, int]] = {}  # level -> (address, right sibling) of the last node seen there
        while pending:
            node, low, high, level = pending.pop()
            self.claim(node, "B-tree node")
            signature, kind, node_level, used, left, right = _tree(image, node)
            if signature != b"TREE" or kind or (level >= 0 and node_level != level) or used > 2 * self.node_k \
                    or (not used and (level >= 0 or node_level)) or node + node_end > self.size:
                raise NotHandled(f"B-tree node at byte {node}")  # only an empty group's root node is empty
            # HDF5 walks each level by the sibling addresses: they must chain the nodes in order.
            before = previous.get(node_level)
            if left != (_UNDEFINED if before is None else before[0]) or (before is not None and before[1] != node):
                raise NotHandled(f"B-tree node at byte {node}: its siblings")
            previous[node_level] = (node, right)
            fields = _quads(2 * used + 1)(image, node + 24)  # key, child, key, ..., key
            keys = [_name(heap, offset) for offset in fields[0::2]]
            children = fields[1::2]
            if (low is not None and keys[0] != low) or (high is not None and keys[-1] != high):
                raise NotHandled(f"B-tree node at byte {node}: its keys differ from its parent's")
            if any(a >= b for a, b in zip(keys, keys[1:])):
                raise NotHandled(f"B-tree node at byte {node}: keys out of order")
            if node_level:
                for i in reversed(range(used)):  # depth first, left to right
                    pending.append((children[i], keys[i], keys[i + 1], node_level - 1))
                continue
            for i, child in enumerate(children):
                names = self.symbol_node(child, heap, out)
                if names[0] <= keys[i] or names[-1] > keys[i + 1]:
                    raise NotHandled(f"symbol table node at byte {child}: names outside its B-tree keys")
        if any(right != _UNDEFINED for _, right in previous.values()):
            raise NotHandled(f"B-tree at byte {address}: a sibling after the last node")
        # Each node's names are in order, within keys in order: so are all names.
        return [(name.decode("utf-8"), entry) for name, entry in out]

    def symbol_node(self, address: int, local_heap: bytes, out: list) -> list[bytes]:
        """Append a symbol table node's entries to ``out`` as ``(name, (header, cache type, B-tree, heap))``; its names."""
        image, seen = self.image, self.seen
        if address in seen:
            raise NotHandled(f"symbol table node at byte {address} reached twice")
        seen.add(address)
        signature, version, count = _snod(image, address)
        if signature != b"SNOD" or version != 1 or not 0 < count <= 2 * self.leaf_k \
                or address + 8 + 80 * self.leaf_k > self.size:  # HDF5 reads the whole node: 2K entries
            raise NotHandled(f"symbol table node at byte {address}")
        fields = iter(_entries(count)(image, address + 8))
        names: list[bytes] = []
        last, heap_size, find = b"", len(local_heap), local_heap.find
        for name_offset, header, cache, btree, heap in zip(fields, fields, fields, fields, fields):
            end = find(b"\0", name_offset)
            if cache > 1 or end <= name_offset or name_offset >= heap_size:
                raise NotHandled("a soft link, or an empty name or one outside its local heap")  # cache type 2: soft
            name = local_heap[name_offset:end]
            if name <= last or b"/" in name or name == b"." or name == b"..":
                raise NotHandled(f"symbol table node at byte {address}: names out of order or unusual")
            names.append(name)
            out.append((name, (header, cache, btree, heap)))
            last = name
        return names

    # --------------------------------------------------------------------------- object headers

    def messages(self, address: int) -> dict[int, list[tuple[int, int]]]:
        """Message type -> (offset, size) of each such message's body, over the header and its continuation blocks
        (whose continuation messages are listed too)."""
        image, size, seen = self.image, self.size, self.seen
        if address in seen:
            raise NotHandled(f"object header at byte {address} reached twice")
        seen.add(address)
        version, _, count, _, chunk = _header_v1(image, address)
        if version != 1:
            raise NotHandled(f"object header version {version} at byte {address}")
        out: dict[int, list[tuple[int, int]]] = {}
        blocks = [(address + 16, address + 16 + chunk)]
        found = 0
        while blocks:
            at, end = blocks.pop()
            if end > size:
                raise NotHandled("object header block past the end of the image")
            while at < end:
                kind, body, flags = _message_v1(image, at)
                at += 8
                if body & 7 or at + body > end or flags & ~0x01:  # unaligned, past its block, or not just "constant"
                    raise NotHandled("object header message past its block, or shared, shareable or unknown")
                found += 1
                if kind == _CONTINUATION:
                    next_block, next_length = _block(image, at)
                    if body != 16 or next_length < 8 or next_block < _SUPERBLOCK_END:
                        raise NotHandled("continuation message")
                    if next_block in seen:
                        raise NotHandled(f"continuation block at byte {next_block} reached twice")
                    seen.add(next_block)
                    blocks.append((next_block, next_block + next_length))
                if kind in out:
                    out[kind].append((at, body))
                else:
                    out[kind] = [(at, body)]
                at += body
        if found != count:
            raise NotHandled(f"object header at byte {address}: {found} messages, {count} declared")
        return out

    def attributes(self, messages: dict[int, list[tuple[int, int]]]) -> dict[str, Attribute]:
        out: dict[str, Attribute] = {}
        image = self.image
        for at, body in messages.get(_ATTRIBUTE, ()):
            end = at + body
            version, flags, name_size, type_size, space_size = _attribute_head(image, at)
            if version == 1:
                sizes = (8, _pad8(name_size), _pad8(type_size), _pad8(space_size))
            elif version in (2, 3) and not flags:  # flags: a shared type or dataspace
                sizes = (8 if version == 2 else 9, name_size, type_size, space_size)
            else:
                raise NotHandled(f"attribute message version {version} or flags {flags}")
            head = sum(sizes)
            if head > body:
                raise NotHandled("attribute past the end of its message")
            encoded = bytes(image[at : at + head])
            decoded = self.attribute_heads.get(encoded)  # Keras writes the same name and type many times
            if decoded is None:
                decoded = self.attribute_heads[encoded] = self.attribute_head(encoded, sizes, name_size, type_size, space_size)
            name, datatype, shape, size = decoded
            if name in out:
                raise NotHandled(f"attribute '{name}' twice")
            if size > end - at - head:
                raise NotHandled("attribute value past the end of its message")
            out[name] = Attribute(datatype, shape, bytes(image[at + head : at + head + size]))
        return out

    def attribute_head(self, encoded: bytes, sizes: tuple[int, ...], name_size: int, type_size: int,
                       space_size: int) -> tuple[str, bytes, tuple[int, ...] | None, int]:
        """An attribute message's name, encoded datatype, shape and value size, from the bytes before its value."""
        at = sizes[0]
        if not name_size or encoded[at + name_size - 1] != 0 or b"\0" in encoded[at : at + name_size - 1]:
            raise NotHandled("attribute name")
        name = encoded[at : at + name_size - 1].decode("utf-8")
        at += sizes[1]
        datatype = encoded[at : at + type_size]
        if type_size < 8:
            raise NotHandled("attribute datatype")
        at += sizes[2]
        shape = _Reader(encoded).dataspace(at, space_size)
        size = _u32(datatype, 4)[0] * (0 if shape is None else _count(shape))
        if size > self.size:
            raise NotHandled("attribute larger than the image")
        return name, datatype, shape, size

    def dataspace(self, at: int, length: int) -> tuple[int, ...] | None:
        """A shape; ``None`` for a null dataspace."""
        image = self.image
        version, rank, flags = image[at], image[at + 1], image[at + 2]
        if version == 1:
            first, null = at + 8, False
        elif version == 2:
            if image[at + 3] not in (0, 1, 2):
                raise NotHandled("dataspace type")
            first, null = at + 4, image[at + 3] == 2
        else:
            raise NotHandled(f"dataspace version {version}")
        if flags & ~1 or rank > 32 or (first - at) + 8 * rank * (1 + (flags & 1)) > length:
            raise NotHandled("dataspace flags, rank or size")
        shape = struct.unpack_from(f"<{rank}Q", image, first)
        if flags & 1 and struct.unpack_from(f"<{rank}Q", image, first + 8 * rank) != shape:
            raise NotHandled("dataspace with maximum dimensions")
        if null:
            if rank:
                raise NotHandled("null dataspace with dimensions")
            return None
        return shape

    def dataset(self, path: str, messages: dict[int, list[tuple[int, int]]]) -> Dataset:
        image = self.image
        space, kind, layout = messages.get(_DATASPACE), messages.get(_DATATYPE), messages.get(_LAYOUT)
        fill = messages.get(_FILL, ())
        if space is None or kind is None or layout is None or len(space) != 1 or len(kind) != 1 \
                or len(layout) != 1 or len(fill) > 1 or not _DATASET.issuperset(messages):
            raise NotHandled(f"'/{path}' is not a plain dataset (or is a group of another kind) {sorted(messages)}")
        shape = self.dataspace(*space[0])
        if shape is None:
            raise NotHandled(f"'/{path}' has a null dataspace")
        at, body = kind[0]
        encoded = bytes(image[at : at + body])
        dtype = self.types.get(encoded)
        if dtype is None:
            dtype = self.types[encoded] = _numeric_type(encoded)
        if fill:
            _fill_value(image, *fill[0])
        at, body = layout[0]
        if body < 4 or image[at] not in (3, 4):
            raise NotHandled("layout message version")
        declared = dtype.itemsize
        for d in shape:
            declared *= d
        if body >= 18 and image[at + 1] == 1:
            _, _, offset, size = _layout(image, at)
            if offset == _UNDEFINED or size != declared or offset > self.size or size > self.size - offset:
                raise NotHandled(f"'/{path}': contiguous storage not allocated or not the declared size")
            compact = None
        elif image[at + 1] == 0:
            size = _u16(image, at + 2)[0]
            offset, compact = None, bytes(image[at + 4 : at + 4 + size])
            if size != declared or len(compact) != size or 4 + size > body:
                raise NotHandled(f"'/{path}': compact storage not the declared size")
        else:
            raise NotHandled(f"'/{path}': chunked or virtual storage")
        attributes = self.attributes(messages) if _ATTRIBUTE in messages else {}
        return Dataset(path, shape, dtype, offset, size, compact, attributes)


@functools.lru_cache(maxsize=64)
def _quads(n: int) -> Any:
    """Unpacks ``n`` little-endian 8-byte numbers (a B-tree node's keys and children)."""
    return struct.Struct(f"<{n}Q").unpack_from


@functools.lru_cache(maxsize=64)
def _entries(n: int) -> Any:
    """Unpacks ``n`` symbol table entries: name offset, header address, cache type, B-tree and heap addresses."""
    return struct.Struct("<" + "QQI4xQQ" * n).unpack_from


class _Template:
    """The layout of (part of) an object header: how to unpack it, which fields must equal ``expected``,
    where the others are (``fields``), its attributes, and, for a header continued elsewhere, the
    layout of that block (``block``) and where its address is (``link``)."""

    __slots__ = ("kind", "unpack", "constants", "expected", "fields", "attributes", "block", "link")

    def __init__(self, kind: int, unpack: Any, constants: list[int], expected: list, fields: Any,
                 attributes: list[tuple[str, bytes, tuple[int, ...] | None, int]]) -> None:
        self.kind, self.unpack, self.fields, self.attributes = kind, unpack, fields, attributes
        self.constants = operator.itemgetter(*constants)
        self.expected = tuple(expected) if len(constants) > 1 else expected[0]
        self.block: _Template | None = None
        self.link = 0

    def attributes_of(self, values: tuple) -> dict[str, Attribute]:
        return {name: Attribute(datatype, shape, values[at]) for name, datatype, shape, at in self.attributes}


class _Layout:
    """Builds a :class:`_Template` from a run of messages read whole (``items``: offset, type, size)."""

    def __init__(self, image: Any, at: int, items: list[tuple[int, int, int]], length: int,
                 heads: dict[bytes, tuple]) -> None:
        self.fmt, self.expected, self.constants, self.heads = ["<"], [], [], heads
        self.fields: dict[str, list[int]] = {}
        self.attributes: list[tuple[str, bytes, tuple[int, ...] | None, int]] = []
        self.count, self.kind, self.ok = 0, _DATASPACE, False
        end = at + length
        for start, kind, body in items:
            if start != at + 8 or not self._message(image, start, kind, body):
                return
            at = start + body
        self.ok = bool(items) and at == end  # the messages fill the block

    def _add(self, code: str, n: int, constant: bool) -> list[int]:
        self.fmt.append(code)
        indices = list(range(self.count, self.count + n))
        self.count += n
        if constant:
            self.constants.extend(indices)
        return indices

    def _message(self, image: Any, start: int, kind: int, body: int) -> bool:
        add, expected, fields = self._add, self.expected, self.fields
        add("HHB3x", 3, True)
        expected.extend(_message_v1(image, start - 8))
        if kind == _DATASPACE:
            version, rank, flags = image[start], image[start + 1], image[start + 2]
            head = 8 if version == 1 else 4
            add("BBBB" + "x" * (head - 4), 4, True)
            expected.extend(image[start : start + 4])
            fields["dims"] = add(f"{rank}Q", rank, False)
            fields["maximum"] = add(f"{rank}Q", rank, False) if flags & 1 else []
            self.fmt.append(f"{body - head - 8 * rank * (1 + (flags & 1))}x")
        elif kind == _DATATYPE:
            fields["type"] = add(f"{body}s", 1, False)
        elif kind == _FILL:
            add(f"{body}s", 1, True)
            expected.append(bytes(image[start : start + body]))
        elif kind == _LAYOUT:
            add("BB", 2, True)
            expected.extend(image[start : start + 2])
            fields["layout"] = add("QQ", 2, False)
            self.fmt.append(f"{body - 18}x")
        elif kind == _SYMBOL_TABLE:
            self.kind = _SYMBOL_TABLE
            fields["table"] = add("QQ", 2, False)
            self.fmt.append(f"{body - 16}x")
        elif kind == _CONTINUATION:
            self.kind = _CONTINUATION
            fields["link"] = add("Q", 1, False)
            add("Q", 1, True)  # the block's length
            expected.append(_u64(image, start + 8)[0])
            self.fmt.append(f"{body - 16}x")
        elif kind == _ATTRIBUTE:
            version, flags, name_size, type_size, space_size = _attribute_head(image, start)
            if version == 1:
                head = 8 + _pad8(name_size) + _pad8(type_size) + _pad8(space_size)
            else:
                head = (8 if version == 2 else 9) + name_size + type_size + space_size
            encoded = bytes(image[start : start + head])
            decoded = self.heads.get(encoded)  # as :meth:`_Reader.attributes` decoded it
            if decoded is None:
                return False
            name, datatype, shape, size = decoded
            add(f"{head}s", 1, True)
            expected.append(encoded)
            self.attributes.append((name, datatype, shape, add(f"{size}s", 1, False)[0]))
            self.fmt.append(f"{body - head - size}x")
        elif kind == _NIL:
            self.fmt.append(f"{body}x")
        else:
            return False
        return True

    def complete(self, group: bool) -> bool:
        """Whether the messages make a plain group or a contiguous dataset, all of whose fields are known."""
        if not self.ok:
            return False
        if group:
            return set(self.fields) == {"table"}
        return set(self.fields) == {"dims", "maximum", "type", "layout"}

    def template(self) -> _Template:
        fields, kind = self.fields, self.kind
        if kind == _SYMBOL_TABLE:
            order: Any = fields["table"]
        elif kind == _DATASPACE:
            dims, maximum = fields["dims"], fields["maximum"]
            order = [slice(dims[0], dims[0] + len(dims)) if dims else slice(0, 0),
                     slice(maximum[0], maximum[0] + len(maximum)) if maximum else None, fields["type"], fields["layout"]]
        else:
            order = fields
        return _Template(kind, struct.Struct("".join(self.fmt)).unpack_from, self.constants, self.expected, order,
                         self.attributes)


def _fill_value(image: Any, at: int, body: int) -> None:
    """Check a fill value message's version and that its value lies within it (HDF5 decodes it on opening)."""
    version = image[at]
    if version == 1 or (version == 2 and image[at + 3]):  # version 2: a size and value only when defined
        start = at + 4
    elif version == 3 and image[at + 1] & 0x20:
        start = at + 2
    elif version in (2, 3):
        return
    else:
        raise NotHandled(f"fill value message version {version}")
    if start + 4 > at + body or start + 4 + _u32(image, start)[0] > at + body:
        raise NotHandled("fill value past the end of its message")


def _name(heap: bytes, offset: int) -> bytes:
    """The NUL-terminated name at ``offset`` of a local heap's data segment."""
    end = heap.find(b"\0", offset)
    if end < 0 or offset >= len(heap):
        raise NotHandled("a name outside its local heap, or without its terminating NUL")
    return heap[offset:end]


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


# Exact encodings of IEEE half, single and double precision: size -> (sign bit, exponent location,
# exponent size, mantissa location, mantissa size, bias).
_IEEE = {2: (15, 10, 5, 0, 10, 15), 4: (31, 23, 8, 0, 23, 127), 8: (63, 52, 11, 0, 52, 1023)}


def _numeric_type(encoded: bytes) -> DataType:
    """The numpy dtype h5py gives a dataset of this HDF5 type (described); only types with an exact numpy twin."""
    kind, bits0, bits1, bits2, size = struct.unpack_from("<BBBBI", encoded)
    klass, version = kind & 0x0F, kind >> 4
    if version != 1:
        raise NotHandled(f"datatype version {version}")
    order = ">" if bits0 & 1 else "<"
    if klass == 0:  # fixed-point
        offset, precision = struct.unpack_from("<HH", encoded, 8)
        if bits0 & ~0x09 or bits1 or bits2 or size not in (1, 2, 4, 8) or offset or precision != 8 * size:
            raise NotHandled("fixed-point type with padding or an unusual size")
        kind = "i" if bits0 & 0x08 else "u"
        return DataType(f"{order}{kind}{size}", kind, size, f"{'int' if kind == 'i' else 'uint'}{8 * size}")
    if klass == 1:  # floating point
        fields = struct.unpack_from("<HHBBBBI", encoded, 8)
        expected = _IEEE.get(size)
        if (bits0 & ~0x01) != 0x20 or bits2 or expected is None or fields[:2] != (0, 8 * size) \
                or (bits1, *fields[2:]) != expected:
            raise NotHandled("floating-point type other than IEEE half, single or double")
        return DataType(f"{order}f{size}", "f", size, f"float{8 * size}")
    if klass == 5:  # opaque without a tag: Keras' bfloat16, which h5py gives as void
        if size < 1 or bits0 or bits1 or bits2:  # h5py turns some tagged ones into other dtypes ("NUMPY:...")
            raise NotHandled("opaque type with a tag")
        return DataType(f"V{size}", "V", size, f"void{8 * size}")
    raise NotHandled(f"datatype class {klass}")


# ------------------------------------------------------------------------------------------------ attributes


def _decode_attribute(image: Any, attribute: Attribute, heaps: dict[int, dict[int, tuple[int, int]]]) -> object:
    datatype, shape, data = attribute.datatype, attribute.shape, attribute.data
    if shape is None:
        raise NotHandled("attribute with a null dataspace")
    kind, bits0, bits1, bits2, size = struct.unpack_from("<BBBBI", datatype)
    klass = kind & 0x0F
    count = _count(shape)
    if klass in (0, 1) and count == 0:  # tf-keras writes [] as an empty float array
        _numeric_type(datatype)
        import numpy as np  # numpy only for arrays (tf-keras' lists): a Keras 3 file is listed without it

        return np.zeros(shape, dtype=np.float64 if klass == 1 else np.int64)
    if klass == 3:  # fixed-length string
        _check_fixed_string(bits0, bits1, bits2, size)
        import numpy as np

        array = np.frombuffer(data, dtype=f"S{size}").reshape(shape)
        if any(b"\0" in item for item in array.flat):  # h5py would cut at the first NUL
            raise NotHandled("fixed-length string with a NUL inside")
        array = array.copy()
        return array[()] if array.ndim == 0 else array
    if klass == 9:  # variable-length: strings only
        texts = _strings(image, datatype, data, count, heaps)
        if not shape:
            return texts[0]
        import numpy as np

        return np.array(texts, dtype=object).reshape(shape)
    raise NotHandled(f"attribute of datatype class {klass}")


def _attribute_list(image: Any, attribute: Attribute, heaps: dict[int, dict[int, tuple[int, int]]]) -> list | None:
    datatype, shape, data = attribute.datatype, attribute.shape, attribute.data
    if shape is None or len(shape) != 1:
        return None
    kind, bits0, bits1, bits2, size = struct.unpack_from("<BBBBI", datatype)
    klass, count = kind & 0x0F, shape[0]
    if klass in (0, 1) and count == 0:
        _numeric_type(datatype)
        return []
    if klass == 3:  # numpy's fixed-length strings drop their trailing NULs
        _check_fixed_string(bits0, bits1, bits2, size)
        if len(data) != count * size:
            raise NotHandled("fixed-length strings of another size than declared")
        items = [data[at : at + size].rstrip(b"\0") for at in range(0, len(data), size)]
        if any(b"\0" in item for item in items):  # h5py would cut at the first NUL
            raise NotHandled("fixed-length string with a NUL inside")
        return items
    if klass == 9:
        return _strings(image, datatype, data, count, heaps)
    raise NotHandled(f"attribute of datatype class {klass}")


def _check_fixed_string(bits0: int, bits1: int, bits2: int, size: int) -> None:
    if bits0 & 0x0F not in (0, 1) or bits0 >> 4 not in (0, 1) or bits1 or bits2 or not size:
        raise NotHandled("fixed-length string padding or character set")


def _strings(image: Any, datatype: bytes, data: bytes, count: int,
             heaps: dict[int, dict[int, tuple[int, int]]]) -> list[str]:
    """The ``count`` variable-length strings whose references are ``data``, read from their global heaps."""
    _, bits0, bits1, bits2, size = struct.unpack_from("<BBBBI", datatype)
    if bits0 & 0x0F != 1 or bits0 >> 4 > 1 or bits1 > 1 or bits2 or size != 16 or datatype[8:20] != _UCHAR:
        raise NotHandled("variable-length type other than a string")
    texts = []
    for i in range(count):
        length, collection, index = struct.unpack_from("<IQI", data, 16 * i)
        objects = heaps.get(collection)
        if objects is None:
            objects = heaps[collection] = _global_heap(image, collection)
        start, stored = objects.get(index, (0, -1))
        if stored != length:
            raise NotHandled("variable-length string not found whole in its global heap")
        raw = bytes(image[start : start + length])
        if b"\0" in raw:
            raise NotHandled("variable-length string with a NUL inside")
        texts.append(raw.decode("utf-8", "surrogateescape"))
    return texts


def _global_heap(image: Any, address: int) -> dict[int, tuple[int, int]]:
    """Index -> (start, size) of the objects of a global heap collection, walked as HDF5 walks it."""
    signature, version, size = struct.unpack_from("<4sB3xQ", image, address)
    if signature != b"GCOL" or version != 1 or size < 4096 or size > len(image) - address:
        raise NotHandled(f"global heap collection at byte {address}")
    objects, at, end = {}, address + 16, address + size
    while end - at >= 16:
        index, _, stored = struct.unpack_from("<HH4xQ", image, at)
        step = 16 + (stored + 7) // 8 * 8 if index else stored
        if step == 0 or step > end - at:
            raise NotHandled(f"global heap collection at byte {address}: an object past its end")
        if index:
            if index in objects:
                raise NotHandled("global heap object twice")
            objects[index] = (at + 16, stored)
        at += step
    return objects
