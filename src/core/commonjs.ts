// A CommonJS package loaded with import(): Node gives its exports both as named exports and as the default export
// (module.exports), but the bundle's chunk for it (esbuild) only as the default export. Reading module.exports
// through `default` works in both, so the sources and the committed bundle behave alike.

export function commonJsModule<T extends object>(loaded: T): T {
  return (loaded as { default?: T }).default ?? loaded;
}
