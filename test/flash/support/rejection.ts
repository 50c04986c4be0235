// The error a flash call must reject with, for assertions on its code, message and details.

import { isMoonflashError, type MoonflashError } from "../../../src/core/errors.js";

/** Awaits a promise that has to reject with a MoonflashError; a resolve or any other error fails the test. */
export async function rejection(promise: Promise<unknown>): Promise<MoonflashError> {
  const err = await promise.then(
    () => {
      throw new Error("expected a rejection");
    },
    (e: unknown) => e,
  );
  if (!isMoonflashError(err)) throw err;
  return err;
}
