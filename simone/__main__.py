from simone.cli import main

raise SystemExit(main())
