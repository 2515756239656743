"""The cryptography secure aggregation uses, all from the ``cryptography`` package.

* Key agreement: X25519. Each agent makes two key pairs per round: ``c`` to encrypt the
  shares it sends to its neighbours, ``s`` to derive the pairwise mask seeds.
* Key derivation: HKDF-SHA256 over the X25519 shared secret, with an ``info`` that binds the
  purpose, the run and the round, so keys of different purposes or rounds never coincide.
* Share transport: ChaCha20-Poly1305 (AEAD); the associated data names sender, receiver, run
  and round, so a ciphertext moved to another pair or round fails to decrypt.
* Masks: the ChaCha20 keystream under a 32-byte seed, read as little-endian ``uint64``
  (:func:`prg`): a real stream cipher as the PRG, the same bytes on every machine.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from protocol.secagg.errors import SecAggError

KEY_BYTES = 32
_NONCE = bytes(16)  # ChaCha20 as a PRG: every seed is used for one stream only


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    try:
        return X25519PrivateKey.from_private_bytes(raw)
    except ValueError as exc:
        raise SecAggError(f"bad private key: {exc}") from None


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _public(raw: bytes) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SecAggError(f"bad public key: {exc}") from None


def derive(private: X25519PrivateKey, peer_public: bytes, purpose: str, context: str) -> bytes:
    """A 32-byte key both ends of a pair derive alike (X25519 + HKDF-SHA256)."""
    try:
        shared = private.exchange(_public(peer_public))
    except ValueError as exc:  # an all-zero shared secret: a low-order public key
        raise SecAggError(f"key agreement failed: {exc}") from None
    info = f"edgefed secagg v1 {purpose} {context}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """Encrypt and authenticate; the 12-byte random nonce leads the ciphertext."""
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """Decrypt what :func:`seal` made; :class:`SecAggError` if it was altered or misrouted."""
    if len(sealed) < 12 + 16:
        raise SecAggError("a sealed share is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], associated)
    except InvalidTag:
        raise SecAggError("a share failed authentication (altered or misrouted)") from None


def prg(seed: bytes, count: int) -> npt.NDArray[np.uint64]:
    """``count`` pseudo-random ring elements from a 32-byte seed (ChaCha20 keystream)."""
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"a mask seed is {KEY_BYTES} bytes")
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * count))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)
