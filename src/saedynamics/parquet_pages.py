"""Where a Parquet column chunk's values lie in the file, for chunks simple enough to read in place.

A column that is required (no null flags), not repeated, PLAIN-encoded, uncompressed and without a
dictionary stores, in each data page, a page header and then exactly its rows' values one after
the other: a V1 data page of such a column has no repetition or definition levels. `plain_pages`
finds those pages by parsing the page headers, so that a reader can copy the values straight out
of a memory-mapped file instead of having Arrow copy them into buffers of its own first.

It accepts only what it can prove from the headers and the footer's metadata (see `plain_pages`)
and returns None for anything else, so that the caller falls back to a full Parquet reader. A
header that cannot be parsed, or that points outside its column chunk or the file, raises
`CorruptPage`; every read is bounds-checked and every loop advances, so that corrupt bytes can
neither read out of bounds nor loop forever.

Page headers are Thrift structs in the compact protocol (parquet.thrift: PageHeader); the few
parts of it needed here are decoded by `CompactReader`, every other field is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

# Thrift compact protocol: the type nibble of a field header or collection header
STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)
MAX_DEPTH = 32  # nesting that `skip` follows; Parquet's headers nest 3 deep
MAX_VARINT_BYTES = 10  # a 64-bit value

# parquet.thrift
DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 2, 3
PLAIN = 0


class CorruptPage(ValueError):
    """A page header that cannot be parsed, or one that points outside its column chunk."""


class CompactReader:
    """Reads Thrift compact-protocol values from data[pos:end]; CorruptPage past `end`."""

    def __init__(self, data, pos: int, end: int):
        self.data, self.pos, self.end = data, pos, end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise CorruptPage(f"truncated at byte {self.pos}")
        self.pos += 1
        # an int of 0-255 from bytes, a signed memoryview or numpy uint8 (which overflows shifted)
        return int(self.data[self.pos - 1]) & 0xFF

    def skip_bytes(self, n: int) -> None:
        if n < 0 or n > self.end - self.pos:
            raise CorruptPage(f"{n} bytes at byte {self.pos}: past the end ({self.end})")
        self.pos += n

    def varint(self) -> int:
        """An unsigned LEB128 integer: 7 bits per byte, low bits first."""
        value = 0
        for shift in range(0, 7 * MAX_VARINT_BYTES, 7):
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
        raise CorruptPage(f"varint longer than {MAX_VARINT_BYTES} bytes at byte {self.pos}")

    def zigzag(self) -> int:
        """A signed integer (i16, i32, i64): zigzag-mapped, then a varint."""
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def fields(self) -> Iterator[tuple[int, int]]:
        """(field id, type) of each field of the struct that starts here, up to its STOP. The
        caller reads or skips each field's value before asking for the next."""
        last = 0
        while True:
            header = self.byte()
            kind, delta = header & 0x0F, header >> 4
            if kind == STOP:
                return
            # a delta of 0: the id follows in full (an i16), else it is the previous id + delta
            last = last + delta if delta else self.zigzag()
            yield last, kind

    def integer(self, kind: int) -> int:
        if kind == BYTE:
            return self.byte()
        if kind in (I16, I32, I64):
            return self.zigzag()
        raise CorruptPage(f"type {kind} where an integer was expected, byte {self.pos}")

    def boolean(self, kind: int) -> bool:
        """A bool field: its value is its type (TRUE or FALSE), nothing follows."""
        if kind not in (TRUE, FALSE):
            raise CorruptPage(f"type {kind} where a bool was expected, byte {self.pos}")
        return kind == TRUE

    def skip(self, kind: int, depth: int = 0) -> None:
        """Skip a value of this type, whatever it holds."""
        if depth > MAX_DEPTH:
            raise CorruptPage(f"nested deeper than {MAX_DEPTH} at byte {self.pos}")
        if kind in (TRUE, FALSE):  # a field's bool is in its type; skip_element handles elements
            return
        if kind == BYTE:
            self.skip_bytes(1)
        elif kind in (I16, I32, I64):
            self.varint()
        elif kind == DOUBLE:
            self.skip_bytes(8)
        elif kind == BINARY:
            self.skip_bytes(self.varint())
        elif kind in (LIST, SET):
            header = self.byte()
            size, element = header >> 4, header & 0x0F
            if size == 15:  # a long list: the size follows
                size = self.varint()
            self._skip_elements(size, [element], depth)
        elif kind == MAP:
            size = self.varint()
            types = self.byte() if size else 0
            self._skip_elements(size, [types >> 4, types & 0x0F], depth)
        elif kind == STRUCT:
            for _, field_kind in self.fields():
                self.skip(field_kind, depth + 1)
        else:
            raise CorruptPage(f"unknown type {kind} at byte {self.pos}")

    def _skip_elements(self, size: int, kinds: list[int], depth: int) -> None:
        # every element takes a byte at least: a size beyond the bytes left is corrupt, and the
        # loop below cannot run long
        if size > self.end - self.pos:
            raise CorruptPage(f"a collection of {size} elements at byte {self.pos}: past the end")
        for _ in range(size):
            for kind in kinds:
                if kind in (TRUE, FALSE):  # a bool element is one byte, not a field's type
                    self.skip_bytes(1)
                else:
                    self.skip(kind, depth + 1)


@dataclass
class PageHeader:
    """The parts of a Parquet PageHeader that say where a page's values are and how they are
    stored; None where the header lacks them."""

    type: int | None = None
    uncompressed_size: int | None = None
    compressed_size: int | None = None
    num_values: int | None = None
    encoding: int | None = None
    # DATA_PAGE_V2 only: the bytes of levels before the values, and whether the values are
    # compressed (Thrift's default: true)
    level_bytes: int = 0
    is_compressed: bool = True
    num_nulls: int = 0


def read_page_header(reader: CompactReader) -> PageHeader:
    """The PageHeader at reader.pos; leaves reader.pos at the page's data."""
    header = PageHeader()
    for field, kind in reader.fields():
        if field == 1:
            header.type = reader.integer(kind)
        elif field == 2:
            header.uncompressed_size = reader.integer(kind)
        elif field == 3:
            header.compressed_size = reader.integer(kind)
        elif field == 5 and kind == STRUCT:  # DataPageHeader
            _read_data_page_header(reader, header)
        elif field == 8 and kind == STRUCT:  # DataPageHeaderV2
            _read_data_page_header_v2(reader, header)
        else:  # crc, the other page types' headers, fields of later format versions
            reader.skip(kind)
    if header.type is None or header.compressed_size is None or header.uncompressed_size is None:
        raise CorruptPage(f"a page header without its type or sizes, ending at byte {reader.pos}")
    if header.compressed_size < 0 or header.uncompressed_size < 0:
        raise CorruptPage(f"a page header with a negative size, ending at byte {reader.pos}")
    return header


def _read_data_page_header(reader: CompactReader, header: PageHeader) -> None:
    for field, kind in reader.fields():
        if field == 1:
            header.num_values = reader.integer(kind)
        elif field == 2:
            header.encoding = reader.integer(kind)
        else:  # the levels' encodings (there are no levels here), statistics
            reader.skip(kind)


def _read_data_page_header_v2(reader: CompactReader, header: PageHeader) -> None:
    for field, kind in reader.fields():
        if field == 1:
            header.num_values = reader.integer(kind)
        elif field == 2:
            header.num_nulls = reader.integer(kind)
        elif field == 4:
            header.encoding = reader.integer(kind)
        elif field in (5, 6):  # definition, repetition levels' byte lengths
            header.level_bytes += reader.integer(kind)
        elif field == 7:
            header.is_compressed = reader.boolean(kind)
        else:  # num_rows (= num_values for a column that is not repeated), statistics
            reader.skip(kind)


def plain_pages(data, chunk, column, file_size: int) -> list[tuple[int, int]] | None:
    """[(offset of the page's values in the file, rows)] for each data page of a column chunk whose
    values are stored as they are, one after the other; None where that cannot be proved.

    `data`: the file's bytes (indexable, e.g. a memoryview or a numpy uint8 array of an mmap);
    `chunk`: its pyarrow ColumnChunkMetaData, `column` its ParquetColumnSchema. Accepted: a
    required, non-repeated FIXED_LEN_BYTE_ARRAY column, uncompressed, without a dictionary page,
    whose pages are V1 data pages (or V2 ones without levels, not compressed) encoded PLAIN, each
    exactly num_values values long, one after the other exactly filling the chunk, the values
    adding up to the chunk's. CorruptPage for a header that cannot be parsed or lies outside the
    chunk or the file.
    """
    width = column.length
    if (
        column.physical_type != "FIXED_LEN_BYTE_ARRAY"
        or not width
        or column.max_definition_level != 0
        or column.max_repetition_level != 0
        or chunk.compression != "UNCOMPRESSED"
        or chunk.has_dictionary_page
        or chunk.dictionary_page_offset is not None
    ):
        return None
    start, size = chunk.data_page_offset, chunk.total_compressed_size
    if start is None or size is None or start < 0 or size < 0 or start + size > file_size:
        raise CorruptPage(
            f"column chunk of {size} bytes at byte {start}: outside the file ({file_size} bytes)"
        )
    end, pos = start + size, start
    pages, rows = [], 0
    while pos < end:  # each turn moves past a header of a byte at least
        reader = CompactReader(data, pos, end)
        header = read_page_header(reader)
        if reader.pos + header.compressed_size > end:
            raise CorruptPage(
                f"a page of {header.compressed_size} bytes at byte {reader.pos}: past the end of "
                f"its column chunk ({end})"
            )
        if not _holds_plain_values(header, width):
            return None
        pages.append((reader.pos + header.level_bytes, header.num_values))
        rows += header.num_values
        pos = reader.pos + header.compressed_size
    return pages if rows == chunk.num_values else None


def _holds_plain_values(header: PageHeader, width: int) -> bool:
    """Whether the page's data is its values' bytes alone (after level_bytes of levels that a V2
    page of this column holds none of)."""
    if header.num_values is None or header.num_values < 0 or header.encoding != PLAIN:
        return False
    values = header.num_values * width
    if header.type == DATA_PAGE:
        return header.compressed_size == header.uncompressed_size == values
    if header.type == DATA_PAGE_V2:
        return (
            not header.is_compressed
            and header.level_bytes == 0
            and header.num_nulls == 0
            and header.compressed_size == header.uncompressed_size == values
        )
    return False
