import { availableParallelism } from 'node:os';
import { defineConfig } from 'vitest/config';

/**
 * Test files in flight. Vitest's default (one less than the cores: a single worker on CI's 2)
 * leaves a core idle: the long suites (fault matrices, interop) spend most of their time waiting
 * on child processes (the CLI, qemu-img) and fdatasync, not computing. One more worker than cores
 * keeps both busy. QCOWKIT_TEST_WORKERS overrides.
 */
const workers = Number(process.env.QCOWKIT_TEST_WORKERS) || Math.min(8, availableParallelism() + 1);

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    pool: 'forks',
    maxWorkers: workers,
    globalSetup: ['test/helpers/global-setup.ts'],
    reporters: ['default'],
  },
});
