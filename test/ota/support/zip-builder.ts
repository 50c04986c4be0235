// A raw zip writer for hostile test packages: local headers, central directory and end record written by hand,
// so a test can make what a well-behaved zip library refuses to: `..` and absolute names, backslashes, NUL bytes,
// duplicate names, symlink and device entries, link extra fields, encryption flags, odd compression methods and
// sizes that lie about what the data inflates to.

import { crc32, deflateRawSync } from "node:zlib";

export interface RawEntry {
  /** As written, byte for byte when a Buffer. */
  name: string | Buffer;
  data?: Buffer | string;
  /** 0 stored, 8 deflate (the default); any other number is written as is, with the data stored. */
  method?: number;
  /** The uncompressed size written in both headers, instead of the real one: a lying header. */
  declaredSize?: number;
  /** Unix mode (type and permission bits) for the external attributes' high 16 bits, e.g. 0o120777 for a symlink. */
  unixMode?: number;
  /** MS-DOS attributes for the low 16 bits, e.g. 0x10 directory, 0x400 reparse point. */
  dosAttributes?: number;
  /** Raw extra field bytes (see extraField). */
  extra?: Buffer;
  /** General purpose flags; default 0x800 (UTF-8 names). */
  flags?: number;
  /** Default Unix (3) << 8 | 2.0. */
  versionMadeBy?: number;
}

/** One extra field record: id, length, data. */
export function extraField(id: number, data: Buffer): Buffer {
  const header = Buffer.alloc(4);
  header.writeUInt16LE(id, 0);
  header.writeUInt16LE(data.length, 2);
  return Buffer.concat([header, data]);
}

const DOS_TIME = 0; // 00:00:00
const DOS_DATE = (40 << 9) | (1 << 5) | 1; // 2020-01-01

/** The bytes of a zip holding `entries` in order. Nothing is validated: that is the point. */
export function buildZip(entries: RawEntry[]): Buffer {
  const locals: Buffer[] = [];
  const centrals: Buffer[] = [];
  let offset = 0;
  for (const entry of entries) {
    const name = Buffer.isBuffer(entry.name) ? entry.name : Buffer.from(entry.name, "utf8");
    const data = Buffer.isBuffer(entry.data) ? entry.data : Buffer.from(entry.data ?? "", "utf8");
    const method = entry.method ?? 8;
    const body = method === 8 ? deflateRawSync(data) : data;
    const size = entry.declaredSize ?? data.length;
    const crc = crc32(data);
    const flags = entry.flags ?? 0x800;
    const extra = entry.extra ?? Buffer.alloc(0);
    const external = (((entry.unixMode ?? 0o100644) << 16) | (entry.dosAttributes ?? 0)) >>> 0;

    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(20, 4);
    local.writeUInt16LE(flags, 6);
    local.writeUInt16LE(method, 8);
    local.writeUInt16LE(DOS_TIME, 10);
    local.writeUInt16LE(DOS_DATE, 12);
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(body.length, 18);
    local.writeUInt32LE(size, 22);
    local.writeUInt16LE(name.length, 26);
    local.writeUInt16LE(extra.length, 28);
    locals.push(local, name, extra, body);

    const central = Buffer.alloc(46);
    central.writeUInt32LE(0x02014b50, 0);
    central.writeUInt16LE(entry.versionMadeBy ?? (3 << 8) | 20, 4);
    central.writeUInt16LE(20, 6);
    central.writeUInt16LE(flags, 8);
    central.writeUInt16LE(method, 10);
    central.writeUInt16LE(DOS_TIME, 12);
    central.writeUInt16LE(DOS_DATE, 14);
    central.writeUInt32LE(crc, 16);
    central.writeUInt32LE(body.length, 20);
    central.writeUInt32LE(size, 24);
    central.writeUInt16LE(name.length, 28);
    central.writeUInt16LE(extra.length, 30);
    central.writeUInt16LE(0, 32); // comment length
    central.writeUInt16LE(0, 34); // disk
    central.writeUInt16LE(0, 36); // internal attributes
    central.writeUInt32LE(external, 38);
    central.writeUInt32LE(offset, 42);
    centrals.push(central, name, extra);

    offset += local.length + name.length + extra.length + body.length;
  }
  const directory = Buffer.concat(centrals);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(entries.length, 8);
  end.writeUInt16LE(entries.length, 10);
  end.writeUInt32LE(directory.length, 12);
  end.writeUInt32LE(offset, 16);
  return Buffer.concat([...locals, directory, end]);
}
