"""The zip structures, as zipfile spells them."""

from __future__ import annotations

import struct

EOCD = struct.Struct("<4s4H2LH")  # end of central directory: 22 bytes, then the comment
EOCD_SIGNATURE = b"PK\x05\x06"
ZIP64_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes, right before the end record
ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # 56 bytes, right before the locator
ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # central directory entry: 46 bytes, then name, extra, comment
CENTRAL_SIGNATURE = b"PK\x01\x02"
LOCAL = struct.Struct("<4s2B4HL2L2H")  # local file header: 30 bytes, then name, extra, data
LOCAL_SIGNATURE = b"PK\x03\x04"
MAX_COMMENT = 1 << 16
ZIP64_EXTRA = 0x0001
FLAG_ENCRYPTED = 0x0001
FLAG_STRONG_ENCRYPTION = 0x0040
FLAG_UTF8 = 0x0800
STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14
MAX_EXTRACT_VERSION = 63  # zipfile refuses newer entries with NotImplementedError
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
