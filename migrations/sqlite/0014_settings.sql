-- Values every process of a deployment must share and none was configured with, made once by
-- the first process that needs one (the result-link secret when [mail] names none).
CREATE TABLE settings (
    name   text PRIMARY KEY,
    value  text NOT NULL
);
