#!/usr/bin/env node
// Tiny launcher: everything lives in dist/ (built by `npm install`). CommonJS (bin/package.json)
// like the CLI bundle it loads: Node's ESM loader would add ~6 ms to every command.
require('../dist/cli-bundle/main.cjs').main(process.argv.slice(2));
