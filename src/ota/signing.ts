// Ed25519 signatures over manifest.json, with node:crypto only. The manifest carries the SHA-256 and size of every
// file, so signing its exact bytes authenticates the whole package.
//
// manifest.sig format: the raw 64-byte Ed25519 signature, base64-encoded (88 characters), on one line; surrounding
// whitespace (a trailing newline) is ignored. Text, not raw bytes, so it survives being pasted, mailed or printed.
// Public keys are accepted as PEM (SPKI, "-----BEGIN PUBLIC KEY-----") or as the raw 32-byte key in base64, which
// fits one line of moonflash.conf. Private keys are PEM (PKCS#8).
//
// node:crypto is loaded on first use (process.getBuiltinModule), not when the agent starts: idle memory.

import type { KeyObject } from "node:crypto";
import { MoonflashError } from "../core/errors.js";
import { SIGNATURE_FILE } from "./manifest.js";

const crypto = () => process.getBuiltinModule("node:crypto");

export interface KeyPair {
  /** SPKI PEM. */
  publicKey: string;
  /** PKCS#8 PEM: keep it secret, it signs packages. */
  privateKey: string;
  /** The raw 32-byte public key in base64: the one-line form for `[ota] public_key`. */
  publicKeyBase64: string;
}

/** A new Ed25519 key pair for signing packages. */
export function keygen(): KeyPair {
  const { publicKey, privateKey } = crypto().generateKeyPairSync("ed25519");
  return {
    publicKey: publicKey.export({ type: "spki", format: "pem" }).toString(),
    privateKey: privateKey.export({ type: "pkcs8", format: "pem" }).toString(),
    publicKeyBase64: rawPublicKey(publicKey).toString("base64"),
  };
}

/** The content of manifest.sig for these manifest bytes: the base64 signature, without a newline. */
export function sign(manifestBytes: Uint8Array, privateKeyPem: string): string {
  return crypto().sign(null, manifestBytes, parsePrivateKey(privateKeyPem)).toString("base64");
}

/**
 * Whether `signature` (manifest.sig's content, as text or bytes) is a valid signature of `manifestBytes`.
 * False for anything that is not a well-formed signature; throws only for a malformed public key.
 */
export function verify(manifestBytes: Uint8Array, signature: string | Uint8Array, publicKey: string | KeyObject): boolean {
  const key = typeof publicKey === "string" ? parsePublicKey(publicKey) : publicKey;
  const text = (typeof signature === "string" ? signature : Buffer.from(signature).toString("latin1")).trim();
  // Exactly 64 bytes in canonical base64: Buffer.from(…, "base64") alone would skip junk and accept a prefix.
  if (!/^[A-Za-z0-9+/]{86}==$/.test(text)) return false;
  const raw = Buffer.from(text, "base64");
  if (raw.length !== 64 || raw.toString("base64") !== text) return false;
  return crypto().verify(null, manifestBytes, key, raw);
}

/** Throws SIGNATURE_INVALID unless `signatureFile` (null when the zip has none) signs `manifestBytes`. */
export function verifyManifestSignature(manifestBytes: Uint8Array, signatureFile: Uint8Array | null, publicKey: string | KeyObject): void {
  if (signatureFile === null) {
    throw new MoonflashError("SIGNATURE_INVALID", `The package has no ${SIGNATURE_FILE}, and [ota] public_key requires signed packages. Nothing was installed.`, {
      reason: "missing",
    });
  }
  if (!verify(manifestBytes, signatureFile, publicKey)) {
    throw new MoonflashError(
      "SIGNATURE_INVALID",
      `The package's ${SIGNATURE_FILE} does not verify against [ota] public_key: it was signed with another key, or manifest.json was changed. Nothing was installed.`,
      { reason: "mismatch" },
    );
  }
}

/**
 * The raw 32-byte key in base64 (44 characters). Checked before anything else: a quarter of such keys start with "/"
 * or "+", and one in 64 would otherwise be taken for an absolute path.
 */
export function isRawPublicKey(text: string): boolean {
  return /^[A-Za-z0-9+/]{43}=$/.test(text.trim());
}

/** A public key from PEM or raw base64 (32 bytes). CONFIG_INVALID when it is neither, or not Ed25519. */
export function parsePublicKey(text: string): KeyObject {
  const trimmed = text.trim();
  let key: KeyObject;
  try {
    if (trimmed.startsWith("-----BEGIN")) {
      key = crypto().createPublicKey(trimmed);
    } else {
      const raw = isRawPublicKey(trimmed) ? Buffer.from(trimmed, "base64") : Buffer.alloc(0);
      if (raw.length !== 32) throw new Error("not 32 bytes of base64");
      key = crypto().createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x: raw.toString("base64url") }, format: "jwk" });
    }
  } catch (err) {
    throw new MoonflashError(
      "CONFIG_INVALID",
      "[ota] public_key is not an Ed25519 public key: give the PEM (BEGIN PUBLIC KEY) or the raw 32-byte key in base64.",
      {},
      { cause: err },
    );
  }
  if (key.asymmetricKeyType !== "ed25519") {
    throw new MoonflashError("CONFIG_INVALID", `[ota] public_key is a ${key.asymmetricKeyType ?? "unknown"} key; packages are signed with Ed25519.`, {
      keyType: key.asymmetricKeyType,
    });
  }
  return key;
}

/** A private key from PEM. INVALID_PARAMS when it is not an Ed25519 private key. */
export function parsePrivateKey(pem: string): KeyObject {
  let key: KeyObject;
  try {
    key = crypto().createPrivateKey(pem);
  } catch (err) {
    throw new MoonflashError("INVALID_PARAMS", "The signing key is not a private key in PEM (BEGIN PRIVATE KEY).", {}, { cause: err });
  }
  if (key.asymmetricKeyType !== "ed25519") {
    throw new MoonflashError("INVALID_PARAMS", `The signing key is a ${key.asymmetricKeyType ?? "unknown"} key; packages are signed with Ed25519.`, {
      keyType: key.asymmetricKeyType,
    });
  }
  return key;
}

/** The public half of a private key (PEM), e.g. to check a package just signed. */
export function publicKeyOf(privateKeyPem: string): KeyObject {
  return crypto().createPublicKey(parsePrivateKey(privateKeyPem));
}

/** The raw 32 bytes of an Ed25519 public key. */
function rawPublicKey(key: KeyObject): Buffer {
  const jwk = key.export({ format: "jwk" });
  return Buffer.from(jwk.x ?? "", "base64url");
}
