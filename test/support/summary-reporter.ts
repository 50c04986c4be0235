// Prints one plain closing line, "N passed, N failed, N skipped", that tools reading CI logs recognise.
//
// "failed" counts everything that makes vitest's run red, not only failing tests: a test file that does not load
// (syntax or import error, a throw at top level), a failing beforeAll/afterAll hook (vitest reports those on the file
// or suite, not on a test) and unhandled errors or rejections. So a red run never closes with "0 failed".

import type { Reporter, SerializedError, TestModule, TestRunEndReason, TestSuite } from "vitest/node";

export default class SummaryReporter implements Reporter {
  onTestRunEnd(testModules: ReadonlyArray<TestModule>, unhandledErrors: ReadonlyArray<SerializedError> = [], reason: TestRunEndReason = "passed"): void {
    const counts = { passed: 0, failed: 0, skipped: 0 };
    const outside: string[] = [];
    for (const module of testModules) {
      let moduleFailures = 0;
      for (const test of module.children.allTests()) {
        const state = test.result().state;
        if (state === "passed") counts.passed++;
        else if (state === "failed") moduleFailures++;
        else counts.skipped++;
      }
      // errors() of a file or suite: collection errors and beforeAll/afterAll failures, never a test's own.
      const suites: Array<TestModule | TestSuite> = [module, ...module.children.allSuites()];
      for (const suite of suites) {
        const errors = suite.errors().length;
        if (errors === 0) continue;
        moduleFailures += errors;
        outside.push(`${errors} in ${suite.type === "module" ? module.relativeModuleId : `${module.relativeModuleId} > ${suite.fullName}`}`);
      }
      // A file vitest marks failed must not pass for green here, whatever the reason it gives.
      if (module.state() === "failed" && moduleFailures === 0) {
        moduleFailures = 1;
        outside.push(`${module.relativeModuleId} failed`);
      }
      counts.failed += moduleFailures;
    }
    if (unhandledErrors.length > 0) {
      counts.failed += unhandledErrors.length;
      outside.push(`${unhandledErrors.length} unhandled`);
    }
    // An interrupted or otherwise failed run with nothing counted yet is still one failure.
    if (reason !== "passed" && counts.failed === 0) {
      counts.failed = 1;
      outside.push(`the run ended ${reason}`);
    }
    if (outside.length > 0) process.stdout.write(`\nfailed includes errors outside tests: ${outside.join("; ")}`);
    process.stdout.write(`\n${counts.passed} passed, ${counts.failed} failed, ${counts.skipped} skipped\n`);
  }
}
