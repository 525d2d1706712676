from saedynamics.cli import main

raise SystemExit(main())
