#!/usr/bin/env node
// Tiny launcher: everything lives in dist/ (built by `npm install`).
import('../dist/cli-bundle/main.js').then((m) => m.main(process.argv.slice(2)));
