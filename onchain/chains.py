"""The chains we send to and take deposits on, and how an address on each is written: one
function gives the stored form of an address, so that registering it and looking it up for an
incoming notification agree.

EVM addresses are hex: `0xABC…` and `0xabc…` are the same account, and the mixed-case spelling
is only an EIP-55 checksum. They are stored in lower case, so PostgreSQL's uniqueness on
(chain, address) is case-insensitive for them. Other chains' addresses (base58, base32, bech32)
are case-sensitive and kept exactly as given.
"""

import re

from Crypto.Hash import keccak

from onchain.exceptions import AddressInvalid

# Circle Mint's chain codes (its transfer API's `Chain`): Polygon is POLY, not MATIC.
CHAINS = {"ETH", "SOL", "POLY", "AVAX", "ARB", "BASE", "OP", "ALGO", "XLM", "TRX", "NOBLE"}
EVM_CHAINS = {"ETH", "POLY", "AVAX", "ARB", "BASE", "OP"}
MAX_ADDRESS_LENGTH = 128

EVM_ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"  # also PostgreSQL's, in the model's CHECK
_EVM_ADDRESS = re.compile(EVM_ADDRESS_PATTERN)
# Every chain's address alphabet is printable ASCII without spaces; a NUL, a space or another
# script is a typing or pasting mistake, and PostgreSQL would not store a NUL anyway.
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")


def address_stored_form(*, chain: str, address: str) -> str:
    """The form an address is stored and looked up in: an EVM chain's hex address in lower case,
    anything else exactly as given (also what a notification names, valid or not: it can only
    match a registered address if it is the same)."""
    if chain in EVM_CHAINS and _EVM_ADDRESS.fullmatch(address):
        return address.lower()
    return address


def address_lookup_form(*, chain: object, address: object) -> str:
    """The stored form of an address an operator or a client names, or AddressInvalid
    naming the field: a known chain, and printable ASCII of 1..MAX_ADDRESS_LENGTH."""
    if not isinstance(chain, str) or chain not in CHAINS:
        raise AddressInvalid("chain", f"chain must be one of {', '.join(sorted(CHAINS))}")
    if not isinstance(address, str) or not 0 < len(address) <= MAX_ADDRESS_LENGTH:
        raise AddressInvalid("address", f"address must be 1..{MAX_ADDRESS_LENGTH} characters")
    if not _PRINTABLE_ASCII.fullmatch(address):
        raise AddressInvalid(
            "address", "address must be printable ASCII without spaces or NUL characters"
        )
    return address_stored_form(chain=chain, address=address)


def address_validate(*, chain: object, address: object) -> str:
    """The stored form of an address someone wants to register as a deposit address or send a
    withdrawal to, or AddressInvalid naming the field: as address_lookup_form, and on an EVM
    chain `0x` and 40 hex digits, all lower, all upper, or a valid EIP-55 checksum."""
    stored = address_lookup_form(chain=chain, address=address)
    if chain not in EVM_CHAINS:
        return stored
    if not _EVM_ADDRESS.fullmatch(address):
        raise AddressInvalid(
            "address", f"a {chain} address is 0x followed by 40 hexadecimal digits"
        )
    digits = address[2:]
    if digits != digits.lower() and digits != digits.upper() and not _eip55_valid(address):
        raise AddressInvalid(
            "address", "the address's mixed case is not a valid EIP-55 checksum (a typo?)"
        )
    return stored


def _eip55_valid(address: str) -> bool:
    """EIP-55: a hex letter is upper case exactly where the Keccak-256 of the lower-case hex
    address has a nibble of 8 or more at that position. (Keccak, not hashlib's SHA3-256: they
    differ in padding.)"""
    digits = address[2:]
    digest = keccak.new(digest_bits=256, data=digits.lower().encode("ascii")).hexdigest()
    return all(
        char == (char.upper() if int(nibble, 16) >= 8 else char.lower())
        for char, nibble in zip(digits, digest, strict=False)
    )
