// A small, deliberate rule set: the recommended rules of ESLint and typescript-eslint (real bugs:
// unused code, unsafe patterns, misused promises need types, so those stay with tsc), with the few
// exceptions this code base has reasons for.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['dist/', 'build/', 'wasm/', 'node_modules/', 'assembly/', 'native/', 'images/', 'bench/results/'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  // The launcher is CommonJS (bin/package.json): Node's ESM loader costs start-up time.
  { files: ['bin/**/*.js'], languageOptions: { sourceType: 'commonjs', globals: { require: 'readonly', module: 'writable', __filename: 'readonly' } } },
  {
    languageOptions: {
      globals: { process: 'readonly', Buffer: 'readonly', console: 'readonly', setTimeout: 'readonly', clearTimeout: 'readonly', setInterval: 'readonly', clearInterval: 'readonly', performance: 'readonly', URL: 'readonly', TextEncoder: 'readonly', TextDecoder: 'readonly', AbortController: 'readonly', AbortSignal: 'readonly', WebAssembly: 'readonly', queueMicrotask: 'readonly', structuredClone: 'readonly' },
    },
    rules: {
      // `_`-prefixed names are deliberately unused (callback signatures).
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none' }],
      // Tests and oracles parse qemu-img's JSON; typing every field there would be noise.
      '@typescript-eslint/no-explicit-any': 'off',
      // Native addons and CommonJS interop load through require() on purpose.
      '@typescript-eslint/no-require-imports': 'off',
      // `declare global { namespace WebAssembly }` is how the missing DOM types are declared.
      '@typescript-eslint/no-namespace': ['error', { allowDeclarations: true }],
    },
  },
);
