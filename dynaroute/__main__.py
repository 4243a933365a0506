from dynaroute.cli import main

raise SystemExit(main())
