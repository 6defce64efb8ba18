from postkeep.cli.main import main

raise SystemExit(main())
