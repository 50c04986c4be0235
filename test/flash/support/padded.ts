// What Katapult writes for an image: the image padded with 0xFF to whole blocks.

export function padded(image: Buffer, blockSize = 64): Buffer {
  const out = Buffer.alloc(Math.ceil(image.length / blockSize) * blockSize, 0xff);
  image.copy(out);
  return out;
}
